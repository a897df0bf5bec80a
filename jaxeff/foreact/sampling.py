"""Foresight sampling: ForeAct's `sample_images` loop (`vf.py:318-455`) as one compiled program.

Guidance (`vf.py:350-356, 433-443`):
- 3-way, when a real source image is given and `image_guidance_scale > 1`: branches
  [(negative caption, null source), (negative caption, source), (caption, source)] combined as
  u + s_img (i - u) + s_txt (f - i);
- otherwise 2-way text guidance: [(negative, source), (caption, source)] -> u + s_txt (f - u).
The official null source is `vae.encode(zeros)`, i.e. a mid-grey image, although training dropped sources to black
(see the package README); the caller passes whichever null latent it wants.
The branches run as one batch through the transformer; the Flow-DPM-Solver++ steps run in `jax.lax.scan`, with one
solver history per view (the official code deep-copies one scheduler per view).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.foreact.generator import ForesightGenerator
from jaxeff.foreact.scheduler import FLOW_SHIFT, dpm_solver_step, flow_sigmas

# default text guidance of app_cli.py (sample_images defaults to 3.0, pipeline.__call__ to 7.5)
GUIDANCE_SCALE = 4.5
IMAGE_GUIDANCE_SCALE = 1.5


def combine_guidance(outs: jax.Array, guidance_scale, image_guidance_scale) -> jax.Array:
    """outs [n, B, ...] branch outputs (n = 3: u, i, f; n = 2: u, f) -> the guided prediction [B, ...]."""
    if outs.shape[0] == 3:
        u, i, f = outs
        return u + image_guidance_scale * (i - u) + guidance_scale * (f - i)
    if outs.shape[0] == 2:
        u, f = outs
        return u + guidance_scale * (f - u)
    raise ValueError(f"expected 2 or 3 guidance branches, got {outs.shape[0]}")


@partial(jax.jit, static_argnames=("graphdef", "num_steps", "shift", "image_cfg", "view_ids", "trajectory"))
def _sample(graphdef, state, noise, sources, null_sources, caption, caption_mask, negative, negative_mask,
            guidance_scale, image_guidance_scale, *, num_steps, shift, image_cfg, view_ids, trajectory):
    model = nnx.merge(graphdef, state)
    sig, ts = flow_sigmas(num_steps, shift)
    sigmas, timesteps = jnp.asarray(sig), jnp.asarray(ts.astype("int32"))
    b = noise[0].shape[0]
    if image_cfg:
        srcs = [jnp.concatenate([n, s, s]) for n, s in zip(null_sources, sources)]
        text = jnp.concatenate([negative, negative, caption])
        mask = jnp.concatenate([negative_mask, negative_mask, caption_mask])
    else:
        srcs = [jnp.concatenate([s, s]) for s in sources]
        text, mask = jnp.concatenate([negative, caption]), jnp.concatenate([negative_mask, caption_mask])
    n_branch = 3 if image_cfg else 2

    def step(carry, i):
        xs, x0s = carry
        t = jnp.full((n_branch * b,), timesteps[i])
        model_in = [jnp.tile(x, (n_branch, 1, 1, 1)).astype(text.dtype) for x in xs]
        outs = model(model_in, srcs, t, text, mask, view_ids)
        new_x, new_x0, rec = [], [], []
        for x, x0, out in zip(xs, x0s, outs):
            v = combine_guidance(out.reshape(n_branch, b, *out.shape[1:]), guidance_scale, image_guidance_scale)
            nx, nx0 = dpm_solver_step(x, v, x0, i, sigmas)
            new_x.append(nx)
            new_x0.append(nx0)
            rec.append((x, out.reshape(n_branch, b, *out.shape[1:]), v))
        return (new_x, new_x0), (rec if trajectory else None)

    init = ([n.astype(jnp.float32) for n in noise], [jnp.zeros_like(n, jnp.float32) for n in noise])
    (xs, _), traj = jax.lax.scan(step, init, jnp.arange(num_steps))
    return xs, traj


def sample(model: ForesightGenerator, noise: Sequence[jax.Array], sources: Sequence[jax.Array],
           caption: jax.Array, caption_mask: jax.Array, negative: jax.Array, negative_mask: jax.Array, *,
           null_sources: Sequence[jax.Array] | None = None, num_steps: int = 8,
           guidance_scale: float = GUIDANCE_SCALE, image_guidance_scale: float = IMAGE_GUIDANCE_SCALE,
           shift: float = FLOW_SHIFT, view_ids: Sequence[int] | None = None, return_trajectory: bool = False):
    """Sample foresight latents, one compiled program per (model, shapes, num_steps, guidance mode).

    noise: per view [B, h, w, C] float32 initial noise; sources: per view [B, h, w, C] scaled source latents;
    caption / negative: [B, L, C_text] features with [B, L] masks (the empty caption's features, repeated, as
    `negative`); null_sources: per view null latents for 3-way guidance (None -> 2-way text guidance, as the
    official code without a source image or with `image_guidance_scale <= 1`). Returns the final latents per view
    (float32), or (latents, trajectory) where trajectory holds per view (latent before each step [S, B, ...], raw
    branch outputs [S, n, B, ...], guided prediction [S, B, ...]). Raises ValueError on mismatched views."""
    if not (len(noise) == len(sources) and (null_sources is None or len(null_sources) == len(noise))):
        raise ValueError("noise, sources (and null_sources) need one entry per view")
    image_cfg = null_sources is not None and image_guidance_scale > 1.0
    graphdef, state = nnx.split(model)
    xs, traj = _sample(graphdef, state, list(noise), list(sources), list(null_sources or sources), caption,
                       caption_mask, negative, negative_mask, jnp.float32(guidance_scale),
                       jnp.float32(image_guidance_scale), num_steps=num_steps, shift=float(shift),
                       image_cfg=image_cfg, view_ids=None if view_ids is None else tuple(view_ids),
                       trajectory=return_trajectory)
    return (xs, traj) if return_trajectory else xs
