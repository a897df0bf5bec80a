"""Shared neural-network building blocks."""

from jaxeff.nn.attention import attention, make_mask, xla_attention
from jaxeff.nn.kv_cache import ContiguousKVCache
from jaxeff.nn.mlp import SwiGLU
from jaxeff.nn.norms import RMSNorm
from jaxeff.nn.rope import RopeScaling, apply_rope, inv_frequencies

__all__ = [
    "attention", "make_mask", "xla_attention", "ContiguousKVCache", "SwiGLU", "RMSNorm", "RopeScaling",
    "apply_rope", "inv_frequencies",
]
