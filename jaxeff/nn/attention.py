"""The attention front door: one function every model calls.

Layout [batch, seq, heads, head_dim] as in `jax.nn.dot_product_attention`; K/V may have fewer heads (GQA).
Masks are described by positions rather than dense boolean arrays: query i sits at `q_positions[b, i]`, key j at
`kv_positions[b, j]` (negative = empty slot). Key j is visible to query i iff it is not empty, and (causal)
`kv_pos <= q_pos`, and (sliding window w) `q_pos - kv_pos < w`. That one rule covers prefill, chunked prefill
with offsets, ragged batches and decode over a cache.

Fully masked rows (a query at an empty slot, or one that sees no key) come back as zeros in every
implementation, and K/V at empty slots are zeroed before use, so garbage there (even NaN) never reaches a real
row, forward or backward.

`implementation`:
- "xla": einsum + float32 softmax; exact reference, runs everywhere (CPU default).
- "dot_product": `jax.nn.dot_product_attention` (XLA picks cuDNN flash attention on GPU where it can); with
  default positions, no window and (if causal) Sq == Sk it passes no mask array (`is_causal` instead).
- "pallas": `pallas_kernels.hybrid_attention` with every head dense; needs contiguous positions
  (`q_positions = offset + arange`, `kv_positions = arange`).
- None: "xla" on CPU, "dot_product" on GPU/TPU.

`logit_softcap=c` caps the scaled logits as `c * tanh(logits / c)` before masking (Gemma-2's
`attn_logit_softcapping`, transformers' `eager_attention_forward`); "dot_product" has no cap, so a capped call
runs "xla", and "pallas" refuses it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = (None, "xla", "dot_product", "pallas")


def default_positions(batch: int, q_len: int, kv_len: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Queries aligned to the end of the keys (q_offset = kv_len - q_len)."""
    q = jnp.broadcast_to(jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32), (batch, q_len))
    kv = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    return q, kv


def make_mask(q_positions, kv_positions, *, causal: bool = True, sliding_window: int | None = None):
    """Boolean [B, Sq, Sk] visibility mask from positions."""
    qp = jnp.asarray(q_positions)[:, :, None]
    kp = jnp.asarray(kv_positions)[:, None, :]
    mask = kp >= 0
    if causal:
        mask &= kp <= qp
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    return mask


def zero_empty_slots(x, positions):
    """x [B, S, H, D] with the rows at empty slots (position < 0) set to 0: a masked slot's garbage (NaN, inf)
    would otherwise reach real rows as 0 * NaN in the weighted sum or in the gradient."""
    return jnp.where((jnp.asarray(positions) >= 0)[:, :, None, None], x, jnp.zeros((), x.dtype))


def _check(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects [B, S, H, D] arrays, got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {k.shape} and v {v.shape} must agree on batch, length and heads")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def soft_cap(x: jnp.ndarray, cap: float | None) -> jnp.ndarray:
    """`cap * tanh(x / cap)` (Gemma-2's attention and final logit soft-capping); x unchanged when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def xla_attention(q, k, v, mask, scale, logit_softcap: float | None = None):
    """Reference: grouped einsum, float32 logits and softmax; rows with no visible key return zeros."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, sq, hkv, hq // hkv, d)
    logits = soft_cap(jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale,
                      logit_softcap)
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.exp(logits - peak)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, sq, hq, d).astype(q.dtype)


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    q_positions: jnp.ndarray | None = None,
    kv_positions: jnp.ndarray | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
    logit_softcap: float | None = None,
    implementation: str | None = None,
) -> jnp.ndarray:
    """Multi-head / grouped-query attention; returns [B, Sq, Hq, D]."""
    _check(q, k, v)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    b, sq, _, d = q.shape
    sk = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    contiguous = q_positions is None and kv_positions is None
    dq, dkv = default_positions(b, sq, sk)
    q_positions = dq if q_positions is None else q_positions
    kv_positions = dkv if kv_positions is None else kv_positions
    if implementation is None:
        implementation = "xla" if jax.default_backend() == "cpu" else "dot_product"
    if implementation == "pallas":
        if not (contiguous and causal and sliding_window is None and logit_softcap is None):
            raise ValueError("implementation='pallas' needs default (contiguous) positions, causal=True, no window, "
                             "no logit_softcap")
        import pallas_kernels

        return pallas_kernels.hybrid_attention(
            q, k, v, streaming_heads=np.zeros((k.shape[2],), bool), sink=0, local=1, q_offset=sk - sq, scale=scale
        )
    if implementation == "dot_product" and logit_softcap is None and contiguous and sliding_window is None and (
            not causal or sq == sk):
        # No empty slot and no ragged mask: no mask array, so cuDNN can take its flash path.
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal)
    mask = make_mask(q_positions, kv_positions, causal=causal, sliding_window=sliding_window)
    k, v = zero_empty_slots(k, kv_positions), zero_empty_slots(v, kv_positions)
    if implementation == "dot_product" and logit_softcap is None:
        # Its masked softmax gives a row with no visible key the mean of V: zero those rows instead.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
        return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(out.dtype)
    return xla_attention(q, k, v, mask, scale, logit_softcap)
