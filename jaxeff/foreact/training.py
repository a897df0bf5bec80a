"""ForeAct's generator training objective (`VisualForesight.forward`, `vf.py:222-302`) and CFG dropout
(`dataloaders/dataset_finetune.py:156-184`).

Rectified flow: one u ~ U(0, 1) per sample ("uniform" weighting, weight 1), index = int(u * 1000),
t = timesteps[index], sigma = sigmas[index] of the (unshifted) training schedule, shared by all views of a sample;
noise drawn per view; x_t = (1 - sigma) x0 + sigma noise; target noise - x0; loss = mean over views of the MSE.
CFG dropout: one r ~ U(0, 1) per sample: caption -> "" if r < 0.2; source -> a black image (all views) if
0.1 <= r < 0.3, i.e. 10 % text only, 10 % both, 10 % image only.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxeff.foreact.generator import ForesightGenerator
from jaxeff.foreact.scheduler import NUM_TRAIN_TIMESTEPS, train_schedule

TEXT_DROP = (0.0, 0.2)   # r in [0, 0.2): caption dropped
IMAGE_DROP = (0.1, 0.3)  # r in [0.1, 0.3): source image dropped (to black)


def training_draws(key: jax.Array, batch: int, view_shapes: Sequence[tuple[int, ...]]):
    """(u [B] float32, noise per view) for `flow_matching_loss`."""
    ku, *kn = jax.random.split(key, 1 + len(view_shapes))
    return jax.random.uniform(ku, (batch,)), [jax.random.normal(k, s) for k, s in zip(kn, view_shapes)]


def timesteps_for(u: jax.Array, shift: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """u [B] in [0, 1) -> (t [B] float32, sigma [B] float32) = schedule[int(u * 1000)]."""
    ts, sigmas = train_schedule(NUM_TRAIN_TIMESTEPS, shift)
    idx = (u.astype(jnp.float32) * NUM_TRAIN_TIMESTEPS).astype(jnp.int32)
    return jnp.asarray(ts)[idx], jnp.asarray(sigmas)[idx]


def flow_matching_loss(model: ForesightGenerator, x0: Sequence[jax.Array], sources: Sequence[jax.Array],
                       caption: jax.Array, caption_mask: jax.Array, u: jax.Array, noise: Sequence[jax.Array],
                       *, view_ids: Sequence[int] | None = None, shift: float = 1.0,
                       return_aux: bool = False):
    """Scalar float32 loss of the official forward; x0, sources, noise: per view [B, h, w, C] (scaled latents);
    u [B]. `shift` 1.0 is the official (unshifted) training schedule. With `return_aux`, also returns
    {"t", "sigma", "noisy", "prediction"}. Raises ValueError for mismatched views."""
    if not (len(x0) == len(sources) == len(noise)):
        raise ValueError("x0, sources and noise need one entry per view")
    t, sigma = timesteps_for(u, shift)
    s = sigma[:, None, None, None]
    noisy = [(1.0 - s) * x + s * n for x, n in zip(x0, noise)]
    preds = model(noisy, sources, t, caption, caption_mask, view_ids)
    losses = [jnp.mean(jnp.square(p.astype(jnp.float32) - (n - x).astype(jnp.float32)))
              for p, n, x in zip(preds, noise, x0)]
    loss = sum(losses) / len(losses)
    return (loss, {"t": t, "sigma": sigma, "noisy": noisy, "prediction": preds}) if return_aux else loss


def cfg_dropout_masks(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """(drop_text [B] bool, drop_image [B] bool) from one uniform r per sample, the official thresholds."""
    r = jax.random.uniform(key, (batch,))
    return (r >= TEXT_DROP[0]) & (r < TEXT_DROP[1]), (r >= IMAGE_DROP[0]) & (r < IMAGE_DROP[1])


def apply_cfg_dropout(key: jax.Array, caption: jax.Array, caption_mask: jax.Array, null_caption: jax.Array,
                      null_mask: jax.Array, sources: Sequence[jax.Array], null_sources: Sequence[jax.Array]):
    """Replace dropped captions by the empty caption's features ([1 or B, L, C] / [1 or B, L]) and dropped sources
    (all views of a sample together) by the black image's latents (per view [1 or B, h, w, C]).
    Returns (caption, caption_mask, sources)."""
    drop_t, drop_i = cfg_dropout_masks(key, caption.shape[0])
    cap = jnp.where(drop_t[:, None, None], null_caption, caption)
    mask = jnp.where(drop_t[:, None], null_mask, caption_mask)
    srcs = [jnp.where(drop_i[:, None, None, None], n, s) for s, n in zip(sources, null_sources)]
    return cap, mask, srcs
