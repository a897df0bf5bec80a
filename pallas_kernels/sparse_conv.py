"""Gather + matmul: the inner op of a sparse convolution with a precomputed neighbour table (SparseRefine).

`gather_matmul(features, table, weight)` computes, for every output row m,

    out[m] = sum_k features[table[m, k]] @ weight[k]        (table[m, k] < 0: no neighbour, contributes 0)

features [N, Cin], table int32 [M, K], weight [K, Cin, Cout] -> [M, Cout] in features.dtype (float32
accumulation). With K = 9 offsets of a 3x3 kernel and a table built from a dense index map this is TorchSparse's
submanifold / strided / transposed conv (one kernel map per conv, `torchsparse.nn.functional.conv`); a 1x1 conv
is K = 1.

Implementations (one dispatch point, `implementation=None|"pallas"|"xla"`):
- `gather_matmul_reference` (the XLA path): pad one zero row; per offset k, gather the rows table[:, k] and
  multiply by weight[k], accumulating in float32.
- Pallas, TPU (Mosaic) style: the table is scalar-prefetched into SMEM; each grid step takes `block_rows` output
  rows, copies their K neighbour rows from the VMEM-resident features into a [block_rows, K*Cin] VMEM scratch
  (row-by-row dynamic-slice loads; absent neighbours write zeros) and does one MXU matmul with weight reshaped to
  [K*Cin, Cout]. The im2col tile never leaves VMEM. Limits: the whole features array and the weight are one
  VMEM block each, so N * Cin and K * Cin * Cout must fit VMEM (about 16 MiB scoped by default); larger inputs
  should use the XLA path. Rows of the table past M (grid padding) are read as "no neighbour".

`implementation=None` picks Pallas on TPU and XLA elsewhere (GPU included: there is no Triton flavour, because
the row gather needs scalar-indexed loads that Triton blocks do not express well).

Backends actually executed: CPU only (the XLA path; the Pallas kernel in the generic interpreter and under
`pltpu.force_tpu_interpret_mode()`, against the reference in `tests/test_pallas_sparse_conv.py`). The kernel
lowers for TPU through `jax.export` (same test file) but has not run on a TPU, so no speed claim is made for it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import check_int, resolve_implementation

__all__ = ["gather_matmul", "gather_matmul_reference"]


def _check(features, table, weight):
    if features.ndim != 2 or table.ndim != 2 or weight.ndim != 3:
        raise ValueError(f"expected features [N, Cin], table [M, K], weight [K, Cin, Cout]; got shapes "
                         f"{features.shape}, {table.shape}, {weight.shape}")
    if not jnp.issubdtype(table.dtype, jnp.integer):
        raise ValueError(f"table must be an integer array, got dtype {table.dtype}")
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise ValueError(f"features must be a floating-point array, got dtype {features.dtype}")
    k, cin, _ = weight.shape
    if table.shape[1] != k or features.shape[1] != cin:
        raise ValueError(f"table has {table.shape[1]} offsets and features {features.shape[1]} channels, but "
                         f"weight [K, Cin, Cout] is {weight.shape}")


def gather_matmul_reference(features, table, weight):
    """Plain-JAX reference: out[m] = sum_k features[table[m, k]] @ weight[k], negative entries contribute 0.

    One row gather and one matmul per offset, accumulated in float32: on the XLA CPU backend this measured about
    7x faster than gathering the whole [M, K, Cin] tensor and contracting it with one einsum (15k rows,
    16 -> 16 channels, 2-core CPU)."""
    _check(features, table, weight)
    n = features.shape[0]
    padded = jnp.concatenate([features, jnp.zeros((1, features.shape[1]), features.dtype)])
    idx = jnp.where(table < 0, n, table).astype(jnp.int32)
    w = weight.astype(features.dtype)
    out = jnp.zeros((table.shape[0], weight.shape[2]), jnp.float32)
    for k in range(table.shape[1]):
        out = out + jnp.dot(padded[idx[:, k]], w[k], preferred_element_type=jnp.float32)
    return out.astype(features.dtype)


def _pallas_gather_matmul(features, table, weight, block_rows: int, interpret: bool):
    n, cin = features.shape
    m, k = table.shape
    cout = weight.shape[2]
    grid = pl.cdiv(m, block_rows)
    # Flattened table padded to whole blocks with -1 (1-D SMEM arrays pad far less than 2-D ones).
    flat = jnp.full((grid * block_rows * k,), -1, jnp.int32).at[: m * k].set(table.reshape(-1).astype(jnp.int32))
    w2 = weight.reshape(k * cin, cout).astype(features.dtype)

    def kernel(tab_ref, f_ref, w_ref, o_ref, cols_ref):
        base = pl.program_id(0) * block_rows * k

        def row(r, carry):
            for j in range(k):  # static: K is 9 or 1
                src = tab_ref[base + r * k + j]
                vals = f_ref[pl.ds(jnp.maximum(src, 0), 1), :].astype(jnp.float32)
                cols_ref[pl.ds(r, 1), pl.ds(j * cin, cin)] = jnp.where(src >= 0, vals, 0.0)
            return carry

        jax.lax.fori_loop(0, block_rows, row, 0)
        o_ref[...] = jnp.dot(cols_ref[...], w_ref[...].astype(jnp.float32),
                             preferred_element_type=jnp.float32).astype(o_ref.dtype)

    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(grid,),
            in_specs=[pl.BlockSpec((n, cin), lambda i, t: (0, 0)),
                      pl.BlockSpec((k * cin, cout), lambda i, t: (0, 0))],
            out_specs=pl.BlockSpec((block_rows, cout), lambda i, t: (i, 0)),
            scratch_shapes=[pltpu.VMEM((block_rows, k * cin), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((grid * block_rows, cout), features.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=pl.CostEstimate(flops=2 * m * k * cin * cout, transcendentals=0,
                                      bytes_accessed=features.dtype.itemsize * (n * cin + m * cout)
                                      + 4 * m * k + weight.dtype.itemsize * k * cin * cout),
        interpret=interpret, name="gather_matmul",
    )(flat, features, w2)
    return out[:m]


@functools.partial(jax.jit, static_argnames=("implementation", "interpret", "block_rows"))
def gather_matmul(features, table, weight, *, implementation: str | None = None, interpret: bool = False,
                  block_rows: int = 128):
    """out[m] = sum_k features[table[m, k]] @ weight[k] (see the module docstring).

    Args:
      features: float [N, Cin]. table: int [M, K], entries in [-1, N) (-1: no neighbour; entries >= N are not
        checked on device and must not occur). weight: [K, Cin, Cout].
      implementation: None (Pallas on TPU, else XLA), "pallas" or "xla".
      interpret: run the Pallas kernel in the interpreter (CPU tests).
      block_rows: output rows per grid step of the Pallas kernel (a multiple of 8).
    Returns: [M, Cout] in features.dtype.
    Raises: ValueError on shape / dtype mismatch, an unknown implementation or a bad block_rows.
    """
    _check(features, table, weight)
    block_rows = check_int("block_rows", block_rows, 8)
    if block_rows % 8:
        raise ValueError(f"block_rows must be a multiple of 8, got {block_rows}")
    if implementation is None and jax.default_backend() == "gpu" and not interpret:
        implementation = "xla"  # no Triton flavour
    impl, flavour = resolve_implementation(implementation, interpret)
    if flavour == "gpu":
        raise ValueError("gather_matmul has no GPU (Triton) Pallas kernel; use implementation='xla' on GPU")
    if impl == "xla" or table.shape[0] == 0:
        return gather_matmul_reference(features, table, weight)
    return _pallas_gather_matmul(features, table, weight, block_rows, flavour == "interpret")
