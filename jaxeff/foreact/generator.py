"""The foresight generator's trainable part: ForeAct's `VisualForesight` minus its frozen text encoder and VAE, i.e.
the image-edit SANA transformer plus, for multi-view models, the view embedding (`vf.py:123-138`). Parameter paths
mirror the released state dict (`transformer.*`, `view_embedding.weight`), so `jaxeff.foreact.weights` loads it by
name."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.foreact.config import SanaConfig
from jaxeff.foreact.sana import SanaEditTransformer


class ForesightGenerator(nnx.Module):
    """`gen(targets, sources, timestep, caption, caption_mask)` -> one velocity [B, h_v, w_v, C] per view (see
    `SanaEditTransformer`). With `config.num_views > 1` a view embedding [num_views, D] (zero-initialised, as the
    official `nn.Embedding` after `zero_()`) is added to view v's tokens; `view_ids` picks its rows (default
    0..V-1)."""

    def __init__(self, config: SanaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.transformer = SanaEditTransformer(config, rngs=rngs, dtype=dtype)
        self.view_embedding = (nnx.Embed(config.num_views, config.inner_dim, embedding_init=nnx.initializers.zeros,
                                         param_dtype=dtype, rngs=rngs) if config.num_views > 1 else None)

    def __call__(self, targets: Sequence[jax.Array], sources: Sequence[jax.Array], timestep: jax.Array,
                 caption: jax.Array, caption_mask: jax.Array, view_ids: Sequence[int] | None = None,
                 *, return_internals: bool = False):
        if self.view_embedding is None:
            if len(targets) > 1:
                raise ValueError(f"a single-view generator got {len(targets)} views (num_views=1 has no view "
                                 "embedding; build it with num_views > 1)")
            embeds = None
        else:
            ids = tuple(range(len(targets))) if view_ids is None else tuple(int(i) for i in view_ids)
            if len(ids) != len(targets) or not all(0 <= i < self.config.num_views for i in ids):
                raise ValueError(f"view_ids {ids} must give one id in [0, {self.config.num_views}) per view")
            embeds = self.view_embedding.embedding[...][jnp.asarray(ids)]
        return self.transformer(targets, sources, timestep, caption, caption_mask, embeds,
                                return_internals=return_internals)
