"""channel_rms_norm / glu_silu: both Pallas kernel flavours (interpret mode) against the references, lowering for
Mosaic and Triton, bad input, and a compiled-path check that runs only on a GPU or TPU backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_pallas_lowering import _lower, fake_tpu_info  # noqa: F401 (fixture)

import pallas_kernels as pk
from pallas_kernels.channel_norm import _fused_glu, _fused_norm, _pallas_gpu_glu, _pallas_gpu_norm

ON_DEVICE = jax.default_backend() in ("gpu", "tpu")


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)


def _norm_inputs(seed, shape, dtype, residual):
    ky, kr, kw, kb = jax.random.split(jax.random.key(seed), 4)
    c = shape[-1]
    y = (3.0 * jax.random.normal(ky, shape) + 0.5).astype(dtype)  # off-centre, not unit scale: RMS != std
    r = jax.random.normal(kr, shape, dtype) if residual else None
    w = 1.0 + 0.3 * jax.random.normal(kw, (c,))
    b = 0.2 * jax.random.normal(kb, (c,))
    return y, w, b, r


def _numpy_norm(y, w, b, r, eps=1e-5):
    yf = np.asarray(y, np.float64)
    out = yf / np.sqrt((yf * yf).mean(-1, keepdims=True) + eps) * np.asarray(w, np.float64) + np.asarray(b, np.float64)
    return out if r is None else out + np.asarray(r, np.float64)


def _close(out, expected, dtype):
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), **_tol(dtype))


# (shape, dtype, residual): odd pixel counts (7*9 = 63 rows), C not a power of two, both dtypes.
NORM_CASES = {
    "c96_f32_res": ((1, 7, 9, 96), jnp.float32, True),
    "c128_bf16": ((2, 7, 9, 128), jnp.bfloat16, False),
    "c512_f32": ((1, 5, 13, 512), jnp.float32, False),
    "c512_bf16_res": ((1, 7, 9, 512), jnp.bfloat16, True),
}


@pytest.mark.parametrize("name", list(NORM_CASES))
def test_pallas_channel_norm_matches_reference(name):
    shape, dtype, residual = NORM_CASES[name]
    y, w, b, r = _norm_inputs(len(name), shape, dtype, residual)
    ref = pk.channel_rms_norm_reference(y, w, b, r)
    assert ref.dtype == dtype
    _close(ref, _numpy_norm(y, w, b, r), dtype)  # the reference against float64 numpy, not against a twin
    c = shape[-1]
    rows = -1, c
    outs = {
        "xla": pk.channel_rms_norm(y, w, b, r, implementation="xla"),
        # TPU-style kernel, several grid steps with a partial last block, and with the default block size.
        "tpu_style_blocked": pk.channel_rms_norm(y, w, b, r, interpret=True, block_rows=16),
        "tpu_style_default": pk.channel_rms_norm(y, w, b, r, interpret=True),
        "gpu_style": _pallas_gpu_norm(y.reshape(rows), w.reshape(1, c), b.reshape(1, c),
                                      None if r is None else r.reshape(rows), 1e-5, 16, True).reshape(shape),
    }
    for out in outs.values():
        assert out.dtype == dtype and out.shape == shape
        _close(out, ref, dtype)


def test_pallas_channel_norm_dispatch():
    y, w, b, r = _norm_inputs(1, (1, 3, 5, 128), jnp.float32, True)
    default = str(jax.make_jaxpr(lambda *a: pk.channel_rms_norm(*a))(y, w, b, r))
    assert ("pallas_call" in default) == ON_DEVICE  # Pallas by default on GPU/TPU only
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: pk.channel_rms_norm(*a, interpret=True))(y, w, b, r))
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: pk.glu_silu(a[0], interpret=True))(y))


def test_pallas_channel_norm_tpu_interpret_mode():
    y, w, b, r = _norm_inputs(2, (1, 7, 9, 256), jnp.bfloat16, True)
    # GLU halves of 256 (two lane-aligned BlockSpecs) and 48 (one row block split in the kernel).
    gates = [jax.random.normal(jax.random.key(3), (1, 7, 9, 512), jnp.bfloat16),
             jax.random.normal(jax.random.key(4), (1, 7, 9, 96), jnp.float32)]
    with pltpu.force_tpu_interpret_mode():
        out = pk.channel_rms_norm(y, w, b, r, implementation="pallas", block_rows=32)  # 63 rows: partial last block
        gated = [pk.glu_silu(yg, implementation="pallas", block_rows=16) for yg in gates]
    _close(out, pk.channel_rms_norm_reference(y, w, b, r), jnp.bfloat16)
    for yg, g in zip(gates, gated):
        _close(g, pk.glu_silu_reference(yg), yg.dtype)


def test_pallas_channel_norm_gradients():
    # The custom VJP (reference autodiff from saved inputs) gives the reference's gradients for every input.
    y, w, b, r = _norm_inputs(4, (1, 7, 9, 96), jnp.float32, True)
    cot = jax.random.normal(jax.random.key(5), y.shape)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * cot)

    ref = jax.grad(loss(pk.channel_rms_norm_reference), (0, 1, 2, 3))(y, w, b, r)
    got = jax.jit(jax.grad(loss(lambda *a: _fused_norm(*a, 1e-5, "interpret", 16)), (0, 1, 2, 3)))(y, w, b, r)
    for g, e in zip(got, ref):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("half,dtype", [(48, jnp.float32), (128, jnp.bfloat16)])
def test_pallas_glu_silu_matches_reference(half, dtype):
    y = (2.0 * jax.random.normal(jax.random.key(half), (1, 7, 9, 2 * half))).astype(dtype)
    ref = pk.glu_silu_reference(y)
    yf = np.asarray(y, np.float64)
    a, g = yf[..., :half], yf[..., half:]
    _close(ref, a * g / (1.0 + np.exp(-g)), dtype)
    outs = [pk.glu_silu(y, implementation="xla"), pk.glu_silu(y, interpret=True, block_rows=16),
            _pallas_gpu_glu(y.reshape(-1, 2 * half), 16, True).reshape(ref.shape)]
    for out in outs:
        assert out.dtype == dtype and out.shape == (1, 7, 9, half)
        _close(out, ref, dtype)
    grad = jax.grad(lambda y: jnp.sum(_fused_glu(y, "interpret", None).astype(jnp.float32)))(y)
    grad_ref = jax.grad(lambda y: jnp.sum(pk.glu_silu_reference(y).astype(jnp.float32)))(y)
    _close(grad, grad_ref, dtype)


@pytest.mark.usefixtures("fake_tpu_info")
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_pallas_channel_norm_lowers(platform):
    call = "tpu_custom_call" if platform == "tpu" else "xla.gpu.triton"
    cases = [((1, 63, 17, 512), jnp.bfloat16, True), ((1, 7, 9, 96), jnp.float32, False)]
    for shape, dtype, residual in cases:
        y = jax.ShapeDtypeStruct(shape, dtype)
        w = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)

        def fn(y, w, b, *r):
            return _fused_norm(y, w, b, r[0] if r else None, 1e-5, platform, None)

        assert _lower(fn, platform, y, w, w, *([y] if residual else [])).count(call) == 1
    for half in (2048, 48):  # aligned halves (two BlockSpecs on TPU) and an odd width
        y = jax.ShapeDtypeStruct((1, 7, 9, 2 * half), jnp.bfloat16)
        assert _lower(lambda y: _fused_glu(y, platform, None), platform, y).count(call) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(w_shape=(64,)), r"weight must have shape \(128,\)"),
    (dict(b_shape=(1, 128)), r"bias must have shape \(128,\)"),
    (dict(r_shape=(1, 3, 4, 128)), "residual must have the shape of y"),
    (dict(r_dtype=jnp.bfloat16), "residual dtype"),
    (dict(y_dtype=jnp.int32), "y must be a floating-point array"),
    (dict(eps=0.0), "eps must be a positive"),
    (dict(block_rows=8, y_dtype=jnp.bfloat16), "block_rows must be a multiple of 16"),
    (dict(block_rows=0), "block_rows must be >= 1"),
])
def test_pallas_channel_norm_bad_input_raises(kwargs, match):
    y = jnp.zeros((1, 3, 5, 128), kwargs.get("y_dtype", jnp.float32))
    r = jnp.zeros(kwargs.get("r_shape", y.shape), kwargs.get("r_dtype", y.dtype))
    with pytest.raises(ValueError, match=match):
        pk.channel_rms_norm(y, jnp.ones(kwargs.get("w_shape", (128,))), jnp.zeros(kwargs.get("b_shape", (128,))), r,
                            eps=kwargs.get("eps", 1e-5), interpret=True, block_rows=kwargs.get("block_rows"))


def test_pallas_glu_silu_and_triton_block_bad_input_raises():
    with pytest.raises(ValueError, match="even, non-zero last dim"):
        pk.glu_silu(jnp.zeros((2, 7)), interpret=True)
    with pytest.raises(ValueError, match="power of two on the Triton kernel"):
        _pallas_gpu_norm(jnp.zeros((9, 96)), jnp.ones((1, 96)), jnp.zeros((1, 96)), None, 1e-5, 12, True)


# Real DC-AE sizes (f32c32 at 512x512: 64x64 maps at 512 channels, 16x16 at 1024; GLUMBConv gates of 4x width)
# plus odd ones. Compiled, not interpreted: runs only where jax's default backend is a GPU or TPU.
DEVICE_NORM_SHAPES = [(1, 64, 64, 512), (1, 16, 16, 1024), (2, 32, 32, 256), (1, 7, 9, 96), (3, 13, 11, 128)]
DEVICE_GLU_SHAPES = [(1, 16, 16, 8192), (1, 32, 32, 4096), (1, 7, 9, 192)]


@pytest.mark.skipif(not ON_DEVICE, reason="needs a GPU or TPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_channel_norm_compiled_on_device(dtype):
    norm = jax.jit(pk.channel_rms_norm, static_argnames=("implementation",))
    for i, shape in enumerate(DEVICE_NORM_SHAPES):
        for residual in (True, False):
            y, w, b, r = _norm_inputs(i, shape, dtype, residual)
            assert "pallas_call" in str(jax.make_jaxpr(lambda *a: pk.channel_rms_norm(*a))(y, w, b, r))
            _close(norm(y, w, b, r, implementation="pallas"), pk.channel_rms_norm_reference(y, w, b, r), dtype)
    y, w, b, r = _norm_inputs(9, DEVICE_NORM_SHAPES[0], dtype, True)
    cot = jax.random.normal(jax.random.key(1), y.shape, dtype)
    grads = [jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum((fn(*a) * cot).astype(jnp.float32)), (0, 1, 2, 3)))(y, w, b, r)
             for fn in (pk.channel_rms_norm, pk.channel_rms_norm_reference)]
    for g, e in zip(*grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=2e-2, atol=2e-2)
    glu = jax.jit(pk.glu_silu, static_argnames=("implementation",))
    for i, shape in enumerate(DEVICE_GLU_SHAPES):
        y = jax.random.normal(jax.random.key(i), shape, dtype)
        _close(glu(y, implementation="pallas"), pk.glu_silu_reference(y), dtype)
