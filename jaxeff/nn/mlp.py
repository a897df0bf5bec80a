"""Feed-forward blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), the Llama / Qwen2 / Mistral MLP."""

    def __init__(self, dim: int, hidden: int, *, use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nnx.initializers.normal(init_std), rngs=rngs)
        self.gate_proj = nnx.Linear(dim, hidden, **kw)
        self.up_proj = nnx.Linear(dim, hidden, **kw)
        self.down_proj = nnx.Linear(hidden, dim, **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class GeGLU(SwiGLU):
    """down(gelu_tanh(gate(x)) * up(x)), the Gemma / Gemma-2 MLP (transformers' `gelu_pytorch_tanh`, the tanh
    approximation of GELU); same parameters as `SwiGLU`."""

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))
