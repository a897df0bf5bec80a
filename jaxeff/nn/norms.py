"""Normalisation layers."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """RMSNorm as Llama/Qwen2 compute it: statistics in float32, scale applied after casting back."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # no randomness: the weight starts at one
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return self.weight[...].astype(dtype) * x32.astype(dtype)


class GemmaRMSNorm(nnx.Module):
    """RMSNorm as Gemma / Gemma-2 compute it (transformers `Gemma2RMSNorm`): the weight is an offset from one,
    `x / rms(x) * (1 + weight)`, all in float32 and cast back at the end (Llama casts before the multiply).
    The weight starts at zero."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
