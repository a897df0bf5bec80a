"""Contiguous KV cache.

A cache is a pytree with one method, `attend(layer, q, k, v, q_positions, ...) -> (out, new_cache)`: it stores the
new keys/values and attends over everything it holds. Models only call that method, so other cache layouts
(DuoAttention's dual cache, LServe's paged cache) plug in by providing the same method.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from jaxeff.nn.attention import attention


@struct.dataclass
class ContiguousKVCache:
    """Per layer k, v [B, T, Hkv, D]; slot t holds the token at position t, so masks come from positions alone."""

    k: tuple[jnp.ndarray, ...]
    v: tuple[jnp.ndarray, ...]

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        shape = (batch, max_len, kv_heads, head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in self.k + self.v)

    def attend(self, layer: int, q, k, v, q_positions, *, sliding_window=None, scale=None, logit_softcap=None,
               implementation=None):
        """Write k/v [B, S, Hkv, D] at slots `q_positions` [B, S], then attend q over slots <= each query position.
        Positions >= max_len are dropped by the scatter; callers check lengths before decoding."""
        batch_idx = jnp.arange(q.shape[0])[:, None]
        new_k = self.k[layer].at[batch_idx, q_positions].set(k.astype(self.k[layer].dtype))
        new_v = self.v[layer].at[batch_idx, q_positions].set(v.astype(self.v[layer].dtype))
        kv_positions = jnp.broadcast_to(jnp.arange(self.max_len, dtype=jnp.int32), (q.shape[0], self.max_len))
        out = attention(
            q, new_k.astype(q.dtype), new_v.astype(q.dtype), q_positions=q_positions, kv_positions=kv_positions,
            causal=True, sliding_window=sliding_window, scale=scale, logit_softcap=logit_softcap,
            implementation=None if implementation == "pallas" else implementation,
        )
        cache = self.replace(
            k=self.k[:layer] + (new_k,) + self.k[layer + 1 :], v=self.v[:layer] + (new_v,) + self.v[layer + 1 :]
        )
        return out, cache
