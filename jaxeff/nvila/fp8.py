"""FP8 linear layers for training, as NVILA's COAT integration does it (NVlabs/VILA `llava/model/qlinear_te.py`,
`llava/model/realquantize/*` at b760c34; ../shared/reference/nvila.md, "FP8 training"):

- per-tensor *current* scaling: every call quantises a tensor with the amax of that same tensor (no amax history;
  Flax's `Fp8DotGeneralOp` is delayed scaling, which is different);
- forward: input and weight in float8_e4m3fn, output in the input's dtype; backward: the output gradient in
  float8_e5m2, and both dgrad and wgrad are FP8 GEMMs (against the e4m3 weight / input saved from the forward);
- only linears with min(in, out) >= `min_features` (3584 in the official code: for Qwen2-7B this skips the
  512-wide k/v projections, and nothing of a smaller LLM is quantised).

Off by default: `enable_fp8(model)` swaps the qualifying `nnx.Linear`s of a model (in place, sharing their
parameters, so checkpoints load and save unchanged) for training; inference uses the plain layers, as officially.
The GEMMs take FP8 operands with float32 accumulation (`preferred_element_type`); run on CPU here (XLA upcasts),
where it is a numerical simulation, not a speed-up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def quantize(x: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-tensor current scaling: -> (x / s in `dtype`, s float32) with s = amax(|x|) / max(dtype) (1 if x == 0)."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / float(jnp.finfo(dtype).max), 1.0)
    return (x.astype(jnp.float32) / scale).astype(dtype), scale


def _gemm(a, b, contract_a: tuple[int, ...], contract_b: tuple[int, ...]):
    return jax.lax.dot_general(a, b, ((contract_a, contract_b), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def fp8_matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """x [..., in] @ w [in, out] with COAT-style FP8 forward and backward; returns x's dtype."""
    return _fp8_fwd(x, w)[0]


def _fp8_fwd(x, w):
    xq, xs = quantize(x, E4M3)
    wq, ws = quantize(w, E4M3)
    y = _gemm(xq, wq, (x.ndim - 1,), (0,)) * (xs * ws)
    # zero-size markers carry the primal dtypes into the backward pass
    return y.astype(x.dtype), (xq, xs, wq, ws, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_bwd(res, g):
    xq, xs, wq, ws, x_marker, w_marker = res
    gq, gs = quantize(g, E5M2)
    dx = _gemm(gq, wq, (g.ndim - 1,), (1,)) * (gs * ws)  # [..., out] x [in, out] -> [..., in]
    batch = tuple(range(g.ndim - 1))
    dw = _gemm(xq, gq, batch, batch) * (xs * gs)  # [..., in] x [..., out] -> [in, out]
    return dx.astype(x_marker.dtype), dw.astype(w_marker.dtype)


fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


class FP8Linear(nnx.Module):
    """An `nnx.Linear`'s parameters (shared, same names) applied through `fp8_matmul`."""

    def __init__(self, linear: nnx.Linear):
        self.kernel = linear.kernel
        self.bias = linear.bias
        self.dtype = linear.dtype

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        y = fp8_matmul(x.astype(dtype), self.kernel[...].astype(dtype))
        return y if self.bias is None else y + self.bias[...].astype(dtype)


# The decoder projections COAT swaps in Qwen2 (`fp8linearqwen2.py:127-187`); lm_head and the embedding stay.
QWEN2_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def enable_fp8(model: nnx.Module, min_features: int = 3584, names: tuple[str, ...] = QWEN2_PROJECTIONS) -> list[str]:
    """Replace, in place, every `nnx.Linear` of `model` named in `names` with min(in, out) >= `min_features` by an
    `FP8Linear` sharing its parameters; returns the dotted paths replaced."""
    targets = [(path, m) for path, m in nnx.iter_modules(model)
               if isinstance(m, nnx.Linear) and path and path[-1] in names
               and min(m.in_features, m.out_features) >= min_features]
    for path, linear in targets:
        parent = model
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        setattr(parent, path[-1], FP8Linear(linear))
    return [".".join(str(p) for p in path) for path, _ in targets]
