"""Small-scale DC-AE training pieces shared by the experiments: seed-stacked models trained under `jax.vmap`,
reconstruction loss, and evaluation on whole held-out images. Run on CPU only."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.dcae.config import DCAEConfig
from jaxeff.dcae.data import psnr, ssim
from jaxeff.dcae.model import DCAE


def stacked_models(cfg: DCAEConfig, seeds: int):
    """(graphdef, params with a leading seed axis) for `seeds` independently initialized models."""
    if "batch_norm" in cfg.decoder_norm_types:
        raise ValueError("training needs rms_norm everywhere: BatchNorm2d here is inference-only (frozen statistics)")
    models = [DCAE.random(cfg, seed=s) for s in range(seeds)]
    graphdef = nnx.graphdef(models[0])
    states = [nnx.state(m) for m in models]
    return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def recon_loss(y: jax.Array, x: jax.Array) -> jax.Array:
    """L1 + MSE."""
    d = (y - x).astype(jnp.float32)
    return jnp.mean(jnp.abs(d)) + jnp.mean(d * d)


def make_vmapped_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable = recon_loss):
    """jit(vmap(step)) over the seed axis: `step(params, opt_state, images) -> (params, opt_state, loss)`."""

    def step(params, opt_state, x):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p)(x), x)

        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(jax.vmap(step), donate_argnums=(0, 1))


def make_vmapped_recon(graphdef):
    """jit(vmap(reconstruct)) over the seed axis: `(params, images [B,H,W,3]) -> [S, B, H, W, 3]`."""
    return jax.jit(jax.vmap(lambda p, x: nnx.merge(graphdef, p)(x), in_axes=(0, None)))


def evaluate(recons: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed mean PSNR and SSIM over images: recons [S, B, H, W, 3], images [B, H, W, 3] -> ([S], [S])."""
    p = np.array([[psnr(r, x) for r, x in zip(rs, images)] for rs in recons]).mean(axis=1)
    s = np.array([[ssim(r, x) for r, x in zip(rs, images)] for rs in recons]).mean(axis=1)
    return p, s
