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
- "dot_product": `jax.nn.dot_product_attention`; with default positions, no window and (if causal) Sq == Sk it
  passes no mask array (`is_causal` instead). jax's `implementation=None` there is its XLA path (jax 0.10.2 and
  0.12, `jax/_src/nn/functions.py`, `case None`: "defaults to XLA for now"), so it materialises the scores like
  "xla" on every backend; cuDNN's fused attention is reached through "pallas" on a GPU.
- "pallas": `pallas_kernels.hybrid_attention` with every head dense, causal or not (`causal=False`: every key
  visible); needs contiguous positions (`q_positions = offset + arange`, `kv_positions = arange`; offset
  `Sk - Sq` when causal), no window, no softcap. On a GPU the kernel entry point sends bf16/fp16 calls with
  head_dim <= 128 (multiple of 8), and Sq == Sk when causal, to cuDNN's fused attention, others to its
  Triton-style kernel; on a TPU it runs its Mosaic (TPU-style) kernel. Flash-style: no [Sq, Sk] score matrix is
  materialised. On CPU it runs the kernel's XLA path (query chunks).
- None: "xla" on CPU, "dot_product" on GPU / TPU.

The kernels are opt-in: `kernel_default` names "pallas" for a call on a TPU that the kernel takes (default
positions, no window, no softcap, Sq >= 128, Sq <= Sk when causal, head_dim 64 or 128), or on a GPU for a bf16 /
fp16 call that goes to cuDNN's fused attention (the causal cuDNN split matched the reference on an H200; the
non-causal call has not run on a GPU), and None otherwise; a model passes it as `implementation` (HART does, for
its attention over the KV cache). Why it pays there: on a TPU
"dot_product" is XLA and materialises every float32 [B, H, Sq, Sk] score matrix (HART's last 1024px scale: 4096 x
9750 per head and batch row, 152 MiB). Evidence for the kernel: its numbers are checked on CPU under
`pltpu.force_tpu_interpret_mode()` (forward and gradients, causal and not), and it lowers for TPU through
`jax.export`, forward and backward, at HART's last-scale shape (tests/test_pallas_lowering.py). Why it is not the
default of None: it has never been compiled by Mosaic or run on a real TPU, and a Pallas call is a custom call that
GSPMD cannot partition (jaxeff/models/sharding.py: its inputs are gathered and it runs whole on every device), so a
sharded model relying on the default's XLA partitioning would silently lose it. Sq < 128 stays on XLA (decode and
short calls: small scores, and the kernel would pad the queries to a block); head_dim is limited to the widths
lowered in the tests. `materializes_scores` says whether a call holds the score matrix (HART sizes its query chunks
by it).

`logit_softcap=c` caps the scaled logits as `c * tanh(logits / c)` before masking (Gemma-2's
`attn_logit_softcapping`, transformers' `eager_attention_forward`); "dot_product" has no cap, so a capped call
runs "xla", and "pallas" refuses it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = (None, "xla", "dot_product", "pallas")
# `kernel_default` takes the TPU kernel from this many queries on, for the head widths lowered for TPU in the tests.
KERNEL_MIN_Q_LEN = 128
KERNEL_HEAD_DIMS = (64, 128)


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


@jax.custom_jvp
def _softmax_or_zeros(logits):
    """Float32 softmax over the last axis of logits with -inf at masked keys; a row that is all -inf gives zeros."""
    peak = jnp.max(logits, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.exp(logits - peak)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(denom > 0, denom, 1.0)


@_softmax_or_zeros.defjvp
def _softmax_or_zeros_jvp(primals, tangents):
    # The softmax's own derivative, p * (t - <p, t>), instead of autodiff through max, exp and the division
    # (jax.nn.softmax does the same); masked keys and all-masked rows have p = 0, so their tangent is 0.
    probs = _softmax_or_zeros(*primals)
    (t,) = tangents
    return probs, probs * (t - jnp.sum(probs * t, axis=-1, keepdims=True))


def xla_attention(q, k, v, mask, scale, logit_softcap: float | None = None):
    """Reference: float32 logits and softmax; rows with no visible key return zeros.

    q [B, Sq, Hq, D], k / v [B, Sk, Hkv, D] (Hq a multiple of Hkv; K/V at empty slots already zeroed), mask bool
    broadcastable to [B, Sq, Sk]; returns [B, Sq, Hq, D] in q.dtype."""
    # Why this layout: the query heads of a KV group are stacked along the rows ([B, Hkv, G*Sq, D]) so both products
    # are plain batched matmuls whose outputs are already in the order the softmax reads (a free reshape to
    # [B, Hkv, G, Sq, Sk] applies the mask). The grouped 5-D einsum "bqhgd,bkhd->bhgqk" made XLA CPU compute the
    # scores as [.., Sk, Sq] and transpose the whole float32 matrix twice (before the softmax and back before P.V).
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, sq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * sq, d)
    logits = jnp.einsum("bhmd,bkhd->bhmk", qg, k, preferred_element_type=jnp.float32)
    logits = soft_cap(logits * scale, logit_softcap).reshape(b, hkv, g, sq, -1)
    probs = _softmax_or_zeros(jnp.where(mask[:, None, None], logits, -jnp.inf)).reshape(b, hkv, g * sq, -1)
    out = jnp.einsum("bhmk,bkhd->bhmd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, hkv, g, sq, d).transpose(0, 3, 1, 2, 4).reshape(b, sq, hq, d).astype(q.dtype)


def kernel_default(q_len: int, kv_len: int, head_dim: int, *, causal: bool = True, dtype=None,
                   backend: str | None = None) -> str | None:
    """"pallas" for a call with default positions, no window and no softcap that a fused kernel takes, else None
    (the per-backend default); see the module docstring. Both need Sq >= KERNEL_MIN_Q_LEN (shorter calls have
    small scores). On a TPU: the Mosaic kernel, for Sq <= Sk when causal, head_dim in KERNEL_HEAD_DIMS. On a GPU:
    only where the kernel entry hands the call to cuDNN's fused attention (jax's
    `dot_product_attention(implementation="cudnn")`): `dtype` bfloat16 / float16, head_dim <= 128 in multiples of
    8, and Sq == Sk when causal; float32 stays on XLA. `backend` defaults to
    `jax.default_backend()`."""
    backend = jax.default_backend() if backend is None else backend
    if backend == "gpu":
        cudnn = (dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
                 and head_dim <= 128 and (not causal or q_len == kv_len) and q_len >= KERNEL_MIN_Q_LEN)
        return "pallas" if cudnn else None
    fits = q_len >= KERNEL_MIN_Q_LEN and (not causal or q_len <= kv_len) and head_dim in KERNEL_HEAD_DIMS
    return "pallas" if backend == "tpu" and fits else None


def resolve_implementation(implementation: str | None, backend: str | None = None) -> str:
    """The implementation `attention` runs: `implementation` itself, or for None "xla" on CPU and "dot_product"
    on GPU / TPU. `backend` defaults to `jax.default_backend()`. Raises ValueError for an unknown
    implementation."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    if implementation is not None:
        return implementation
    backend = jax.default_backend() if backend is None else backend
    return "xla" if backend == "cpu" else "dot_product"


def materializes_scores(implementation: str | None, backend: str | None = None) -> bool:
    """Whether `attention` holds the whole [B, H, Sq, Sk] float32 score matrix: True for "xla" and "dot_product"
    (jax's `dot_product_attention` without an implementation is its XLA path, see the module docstring), False for
    "pallas" on a GPU / TPU (flash-style kernels and cuDNN's fused attention work block by block); "pallas" on CPU
    runs the kernel's XLA path, whose query chunks XLA may all keep alive, so True there. None is resolved first
    (`resolve_implementation`), so True. `backend` defaults to `jax.default_backend()`. A caller bounds its memory
    by chunking the queries only when this is True."""
    backend = jax.default_backend() if backend is None else backend
    return resolve_implementation(implementation, backend) != "pallas" or backend not in ("gpu", "tpu")


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
    """Multi-head / grouped-query attention; returns [B, Sq, Hq, D] in q.dtype.

    Raises ValueError for mismatched shapes, an unknown implementation, or "pallas" with explicit positions, a
    window, a softcap, or (causal) more queries than keys."""
    _check(q, k, v)
    b, sq, _, d = q.shape
    sk = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    contiguous = q_positions is None and kv_positions is None
    implementation = resolve_implementation(implementation)
    dq, dkv = default_positions(b, sq, sk)
    q_positions = dq if q_positions is None else q_positions
    kv_positions = dkv if kv_positions is None else kv_positions
    if implementation == "pallas":
        if not (contiguous and sliding_window is None and logit_softcap is None and (not causal or sq <= sk)):
            raise ValueError("implementation='pallas' needs default (contiguous) positions, no window, no "
                             "logit_softcap and, when causal, q_len <= kv_len")
        import pallas_kernels

        return pallas_kernels.hybrid_attention(
            q, k, v, streaming_heads=np.zeros((k.shape[2],), bool), sink=0, local=1,
            q_offset=sk - sq if causal else 0, scale=scale, causal=causal)
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
