"""Small-scale DC-AE training pieces shared by the experiments: model init, a jitted train step, reconstruction loss,
and evaluation on whole held-out images. Seeds run one after another through the same compiled step (vmapping over
parameters would turn every conv into a grouped conv, which XLA:CPU runs far slower). Run on CPU only."""

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


def init_model(cfg: DCAEConfig, seed: int):
    """(graphdef, params) of a freshly initialized trainable DC-AE."""
    if "batch_norm" in cfg.decoder_norm_types:
        raise ValueError("training needs rms_norm everywhere: BatchNorm2d here is inference-only (frozen statistics)")
    return nnx.split(DCAE.random(cfg, seed=seed))


def recon_loss(y: jax.Array, x: jax.Array) -> jax.Array:
    """L1 + MSE."""
    d = (y - x).astype(jnp.float32)
    return jnp.mean(jnp.abs(d)) + jnp.mean(d * d)


def make_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable = recon_loss):
    """Jitted `step(params, opt_state, images) -> (params, opt_state, loss)` with `loss_fn(reconstruction, images)`."""

    def step(params, opt_state, x):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p)(x), x)

        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def make_recon(graphdef):
    """Jitted `(params, images [B, H, W, 3]) -> reconstructions`."""
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))


def evaluate(recons: np.ndarray, images: np.ndarray) -> tuple[float, float]:
    """Mean PSNR and SSIM over a batch of reconstructions of `images` ([B, H, W, 3] in [-1, 1])."""
    return (float(np.mean([psnr(r, x) for r, x in zip(recons, images)])),
            float(np.mean([ssim(r, x) for r, x in zip(recons, images)])))
