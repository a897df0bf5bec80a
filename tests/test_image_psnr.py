"""The shared float-image PSNR (`jaxeff.data.psnr`, data range 2) and the dtype check (`require_float`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.data import psnr, require_float


def test_psnr_per_image_data_range_2_and_pooled_batch():
    rng = np.random.default_rng(0)
    ref = rng.uniform(-1, 1, (3, 8, 6, 3)).astype(np.float32)
    x = (ref + rng.normal(0, [[[[0.01]]], [[[0.05]]], [[[0.2]]]], ref.shape)).astype(np.float32)
    mse = ((x.astype(np.float64) - ref) ** 2).mean(axis=(1, 2, 3))
    got = np.asarray(psnr(x, ref))
    np.testing.assert_allclose(got, 10 * np.log10(2.0**2 / mse), rtol=1e-5)
    assert got[0] > got[1] > got[2]  # per image, not one pooled number
    # the same images on the [0, 1] scale with data range 1 give the same PSNR
    np.testing.assert_allclose(got, 10 * np.log10(1.0 / (((x - ref) / 2.0) ** 2).mean(axis=(1, 2, 3))), rtol=1e-5)
    # the batch as one image: the MSE pooled over every image
    pooled = float(psnr(x[None], ref[None])[0])
    np.testing.assert_allclose(pooled, 10 * np.log10(4.0 / mse.mean()), rtol=1e-5)
    assert float(psnr(ref, ref)[0]) == pytest.approx(100.0)  # identical images: the documented 100 dB cap
    np.testing.assert_allclose(jax.jit(psnr)(jnp.asarray(x), jnp.asarray(ref)), got, rtol=1e-5)  # traceable
    assert psnr(jnp.asarray(x, jnp.bfloat16), ref).dtype == jnp.float32


def test_psnr_and_require_float_refuse_bad_input():
    ref = np.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match=r"psnr got uint8 values; it expects float images in \[-1, 1\].*127.5 - 1"):
        psnr(np.zeros((2, 4, 4, 3), np.uint8), ref)
    with pytest.raises(ValueError, match="one shape"):
        psnr(ref[:1], ref)
    with pytest.raises(ValueError, match="model.encode got int32"):
        jax.jit(lambda v: require_float(v, "model.encode"))(jnp.zeros(3, jnp.int32))
    require_float(jnp.zeros(3, jnp.bfloat16), "x")  # any float dtype passes
