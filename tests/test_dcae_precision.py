"""DC-AE's linear attention precision: the official per-dtype rule by default, diffusers' float32 as an option."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.dcae import DCAE, DCAEConfig
from jaxeff.dcae.model import LiteMLA

# One EfficientViT stage at 8x8 (64 tokens > head dim 8: the linear-attention path) in the encoder and decoder.
CFG = DCAEConfig(latent_channels=4, attention_head_dim=8, encoder_block_types=("ResBlock", "EfficientViTBlock"),
                 decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
                 decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                 encoder_qkv_multiscales=((),) * 2, decoder_qkv_multiscales=((),) * 2,
                 decoder_norm_types=("rms_norm",) * 2, decoder_act_fns=("silu",) * 2)


def test_dcae_linear_attention_precision_is_official_by_default():
    """float32 parameters: identical with and without `fp32_attention`; bfloat16 parameters: the official bfloat16
    matmuls differ from diffusers' float32 attention by bfloat16 roundings (close, not equal)."""
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    outs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        for fp32 in (False, True):
            model = DCAE.random(CFG, 0, dtype=dtype, fp32_attention=fp32)
            attn = [m for _, m in nnx.iter_modules(model) if isinstance(m, LiteMLA)]
            assert len(attn) == 2 and {m.precision for m in attn} == {"float32" if fp32 else "efficientvit"}
            outs[dtype, fp32] = np.asarray(model.encode(x), np.float32)
    np.testing.assert_array_equal(outs[jnp.float32, False], outs[jnp.float32, True])
    diff = np.abs(outs[jnp.bfloat16, False] - outs[jnp.bfloat16, True]).max()
    assert 0 < diff < 0.1 * np.abs(outs[jnp.bfloat16, True]).max()
