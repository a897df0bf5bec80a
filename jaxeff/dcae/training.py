"""Small-scale DC-AE training pieces shared by the experiments: model init, a jitted functional train step that
carries BatchNorm statistics, and reconstruction losses (evaluation: `metrics.reconstruction_metrics`). Seeds run
one after another through the same compiled step (vmapping over parameters would turn every conv into a grouped
conv, which XLA:CPU runs far slower). Run on CPU only.

There is no official DC-AE training code. The maintainers describe the phase-1/2 reconstruction loss as L1 +
perceptual (efficientvit #143); the 0.25 LPIPS-VGG16 weight is a third-party reading (lavinal712/AutoencoderKL's
dc-ae configs, unverified), i.e. our interpretation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxeff.dcae import perceptual
from jaxeff.dcae.config import DCAEConfig
from jaxeff.dcae.model import DCAE, BatchNorm2d

LPIPS_LOSS_WEIGHT = 0.25


def init_model(cfg: DCAEConfig, seed: int):
    """(graphdef, params, stats) of a freshly initialized DC-AE: `params` the `nnx.Param`s the optimizer updates,
    `stats` the BatchNorm running statistics (`nnx.BatchStat`; empty for rms-norm-only configs)."""
    return nnx.split(DCAE.random(cfg, seed=seed), nnx.Param, ...)


def set_norm_modes(model: nnx.Module, train_norms: tuple[str, ...]) -> None:
    """BatchNorm layers whose dotted path starts with one of `train_norms` ("" = all) go to training mode (batch
    statistics, running-average updates); the others use their running statistics (a frozen layer stays frozen)."""
    for path, m in nnx.iter_modules(model):
        if isinstance(m, BatchNorm2d):
            m.use_running_average = not ".".join(map(str, path)).startswith(train_norms)


def l1_mse_loss(y: jax.Array, x: jax.Array) -> jax.Array:
    """mean |y - x| + mean (y - x)^2 (the residual-autoencoding ablation's loss, not the paper's)."""
    d = (y - x).astype(jnp.float32)
    return jnp.mean(jnp.abs(d)) + jnp.mean(d * d)


def l1_loss(y: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs((y - x).astype(jnp.float32)))


def l1_lpips_loss(y: jax.Array, x: jax.Array, lpips_weights: dict, weight: float = LPIPS_LOSS_WEIGHT) -> jax.Array:
    """The DC-AE reconstruction loss: mean |y - x| + weight * mean LPIPS(y, x) (`perceptual.lpips`)."""
    return l1_loss(y, x) + weight * jnp.mean(perceptual.lpips(lpips_weights, y, x))


def make_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable = l1_mse_loss, loss_args: tuple = (),
              train_norms: tuple[str, ...] = ("",)):
    """Jitted `step(params, stats, opt_state, images [B, H, W, 3]) -> (params, stats, opt_state, loss)` with
    `loss_fn(reconstruction, images, *loss_args)`; `loss_args` (e.g. LPIPS weights) enter the compiled step as
    arguments, not as constants. BatchNorm layers under `train_norms` train (see `set_norm_modes`)."""

    def step(params, stats, opt_state, x, loss_args):
        def f(p):
            model = nnx.merge(graphdef, p, stats, copy=True)  # fresh variables: BatchNorm updates them in this trace
            set_norm_modes(model, train_norms)
            return loss_fn(model(x), x, *loss_args), nnx.state(model, nnx.BatchStat)

        (loss, stats), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    return functools.partial(_call_with, jitted, loss_args)


def _call_with(fn, loss_args, params, stats, opt_state, x):
    return fn(params, stats, opt_state, x, loss_args)


def make_recon(graphdef):
    """Jitted `(params, stats, images [B, H, W, 3]) -> reconstructions`, BatchNorm in eval mode."""

    def recon(params, stats, x):
        model = nnx.merge(graphdef, params, stats)
        model.eval()
        return model(x)

    return jax.jit(recon)

