"""`jaxeff.nn.vqgan` precision options: bfloat16 activations keep float32 GroupNorm statistics."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.nn import vqgan


def test_bfloat16_group_norm_statistics_in_float32():
    """A bf16 GroupNorm on bf16 activations far from zero (mean 300, std 4: bf16 spacing 2 there) equals the float32
    GroupNorm of the same values up to the output's bf16 rounding; statistics summed in bf16 would lose the
    variance. Its scale / bias stay float32; a bf16 conv stores bf16 weights and returns bf16."""
    x = (300 + 4 * jax.random.normal(jax.random.key(0), (2, 16, 16, 32))).astype(jnp.bfloat16)
    gn16, gn32 = (vqgan.group_norm(32, 8, nnx.Rngs(0), dt) for dt in (jnp.bfloat16, jnp.float32))
    assert gn16.scale[...].dtype == jnp.float32
    y16, y32 = gn16(x), gn32(x.astype(jnp.float32))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), atol=0.02, rtol=0.01)
    c = vqgan.conv(32, 16, 3, nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert c.kernel[...].dtype == jnp.bfloat16 and c(y16).dtype == jnp.bfloat16
