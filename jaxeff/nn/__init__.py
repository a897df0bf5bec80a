"""Shared neural-network building blocks."""

from jaxeff.nn.attention import attention, make_mask, soft_cap, xla_attention
from jaxeff.nn.conv import depthwise_conv, depthwise_conv_shifted, glu_mbconv
from jaxeff.nn.kv_cache import ContiguousKVCache
from jaxeff.nn.linear_attention import relu_linear_attention
from jaxeff.nn.mlp import GeGLU, SwiGLU
from jaxeff.nn.norms import GemmaRMSNorm, RMSNorm
from jaxeff.nn.rope import RopeScaling, apply_rope, inv_frequencies

__all__ = [
    "attention", "make_mask", "soft_cap", "xla_attention", "ContiguousKVCache", "GeGLU", "SwiGLU", "GemmaRMSNorm",
    "RMSNorm", "RopeScaling", "apply_rope", "inv_frequencies", "depthwise_conv", "depthwise_conv_shifted",
    "glu_mbconv", "relu_linear_attention",
]
