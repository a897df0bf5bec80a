"""Shared helpers: backend dispatch, static-argument checks and the token mask used by every kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as _jax_config  # no public getter for pltpu.force_tpu_interpret_mode's state

# Finite, so a row whose block is fully masked gives exp(0) * 0 instead of NaN in the online softmax.
MASK_VALUE = -1e30

IMPLEMENTATIONS = (None, "pallas", "xla")


def resolve_implementation(implementation: str | None, interpret: bool) -> tuple[str, str]:
    """Returns (implementation, pallas flavour) with flavour "tpu", "gpu" or "interpret".

    None picks Pallas on GPU/TPU and XLA elsewhere. Pallas on CPU needs `interpret=True` (TPU-style kernel in
    the generic interpreter) or `pltpu.force_tpu_interpret_mode()` (TPU-style kernel in TPU interpret mode).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    backend = jax.default_backend()
    if implementation is None:
        implementation = "pallas" if backend in ("gpu", "tpu") or interpret else "xla"
    if implementation == "xla":
        return "xla", ""
    if interpret:
        return "pallas", "interpret"
    if _jax_config.pallas_tpu_interpret_mode_context_manager.value is not None:
        return "pallas", "tpu"
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"implementation='pallas' on backend {backend!r} needs interpret=True")
    return "pallas", backend


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a Python int (static), got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_streaming_heads(streaming_heads, num_kv_heads: int) -> tuple[jax.Array, np.ndarray | None]:
    """Returns (flags as int32 [Hkv] array, static bool numpy copy or None when traced)."""
    shape = tuple(np.shape(streaming_heads))
    if shape != (num_kv_heads,):
        raise ValueError(f"streaming_heads must have shape ({num_kv_heads},) (one flag per KV head), got {shape}")
    if isinstance(streaming_heads, jax.core.Tracer):
        return jnp.asarray(streaming_heads).astype(jnp.int32), None
    static = np.asarray(streaming_heads).astype(bool)
    return jnp.asarray(static, jnp.int32), static


def check_gqa(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    return num_q_heads // num_kv_heads


def token_mask(q_pos, k_pos, streaming, sink: int, local: int):
    """Key k_pos visible to query q_pos: causal, and for streaming heads also a sink or local-window token."""
    window = (k_pos < sink) | (q_pos - k_pos < local)
    return (k_pos <= q_pos) & (jnp.logical_not(streaming) | window)


def masked_softmax(s, mask):
    """Softmax of s over the last axis restricted to `mask`; a row with no visible entry gives zeros (not the
    uniform average a plain softmax of masked logits gives)."""
    s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.where(mask, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def default_scale(scale, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)
