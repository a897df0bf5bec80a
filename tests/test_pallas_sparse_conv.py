"""gather_matmul (SparseRefine's sparse conv): the Pallas kernel in interpret modes against the plain-JAX reference,
the dispatcher, bad input, and the TPU lowering through jax.export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu
from test_pallas_lowering import fake_tpu_info  # noqa: F401  (fixture: a v5e for Mosaic lowering)

from pallas_kernels.sparse_conv import _pallas_gather_matmul, gather_matmul, gather_matmul_reference


def _inputs(seed, n, m, k, cin, cout, dtype=jnp.float32, empty_rows=3):
    rng = np.random.default_rng(seed)
    table = rng.integers(-1, n, (m, k)).astype(np.int32)
    table[rng.choice(m, min(empty_rows, m), replace=False)] = -1  # padded capacity slots: no neighbour at all
    return (jnp.asarray(rng.normal(size=(n, cin)), dtype), jnp.asarray(table),
            jnp.asarray(rng.normal(size=(k, cin, cout)), dtype))


def _loop(features, table, weight):
    f, t, w = (np.asarray(a, np.float64) for a in (features, table, weight))
    out = np.zeros((t.shape[0], w.shape[2]))
    for i, row in enumerate(t.astype(int)):
        for j, src in enumerate(row):
            if src >= 0:
                out[i] += f[src] @ w[j]
    return out


def test_pallas_reference_matches_loop():
    f, t, w = _inputs(0, 11, 7, 9, 3, 5)
    np.testing.assert_allclose(gather_matmul_reference(f, t, w), _loop(f, t, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,m,k,cin,cout,block", [(37, 29, 9, 5, 7, 8), (5, 40, 1, 3, 4, 16), (64, 19, 9, 8, 8, 32)])
def test_pallas_gather_matmul_interpret(n, m, k, cin, cout, block):
    f, t, w = _inputs(n * m, n, m, k, cin, cout)  # odd sizes, M not a multiple of the block, padded rows
    ref = gather_matmul_reference(f, t, w)
    out = gather_matmul(f, t, w, implementation="pallas", interpret=True, block_rows=block)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[np.all(np.asarray(t) < 0, axis=1)] == 0)


def test_pallas_gather_matmul_tpu_interpret_bf16():
    f, t, w = _inputs(5, 23, 21, 9, 4, 6, dtype=jnp.bfloat16)
    with pltpu.force_tpu_interpret_mode():
        out = gather_matmul(f, t, w, implementation="pallas", block_rows=8)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _loop(f, t, w), rtol=3e-2, atol=3e-2)


def test_pallas_dispatch_and_errors():
    f, t, w = _inputs(1, 9, 6, 9, 2, 3)
    jaxpr = str(jax.make_jaxpr(lambda a, b, c: gather_matmul(a, b, c))(f, t, w))
    assert "pallas_call" not in jaxpr  # CPU default: the XLA path
    assert "pallas_call" in str(jax.make_jaxpr(
        lambda a, b, c: gather_matmul(a, b, c, implementation="pallas", interpret=True))(f, t, w))
    with pytest.raises(ValueError, match="needs interpret=True"):
        gather_matmul(f, t, w, implementation="pallas")
    with pytest.raises(ValueError, match="offsets"):
        gather_matmul(f, t[:, :4], w)
    with pytest.raises(ValueError, match="integer"):
        gather_matmul(f, t.astype(jnp.float32), w)
    with pytest.raises(ValueError, match="multiple of 8"):
        gather_matmul(f, t, w, implementation="pallas", interpret=True, block_rows=12)
    with pytest.raises(ValueError, match="implementation"):
        gather_matmul(f, t, w, implementation="triton")


def test_pallas_gather_matmul_lowers_for_tpu(fake_tpu_info):  # noqa: F811
    shapes = (jax.ShapeDtypeStruct((4096, 32), jnp.bfloat16), jax.ShapeDtypeStruct((3000, 9), jnp.int32),
              jax.ShapeDtypeStruct((9, 32, 64), jnp.bfloat16))
    fn = jax.jit(lambda f, t, w: _pallas_gather_matmul(f, t, w, 128, False))
    text = export.export(fn, platforms=["tpu"])(*shapes).mlir_module()
    assert text.count("tpu_custom_call") == 1
