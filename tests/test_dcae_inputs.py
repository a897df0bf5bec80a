"""DC-AE refuses bad input by name (no torch needed): integer images anywhere an image in [-1, 1] is meant,
unknown config / loss / image names."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxeff.dcae import DCAE, DCAEConfig, metrics, perceptual
from jaxeff.dcae.data import load_image, to_signed
from jaxeff.dcae.training import init_model, make_step

TINY = DCAEConfig(latent_channels=4, attention_head_dim=8, encoder_block_types=("ResBlock",) * 2,
                  decoder_block_types=("ResBlock",) * 2, encoder_block_out_channels=(8, 8),
                  decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                  encoder_qkv_multiscales=((),) * 2, decoder_qkv_multiscales=((),) * 2,
                  decoder_norm_types=("rms_norm",) * 2, decoder_act_fns=("silu",) * 2)
UINT8 = np.full((1, 8, 8, 3), 200, np.uint8)


def test_dcae_refuses_uint8_images_everywhere():
    graphdef, params, stats = init_model(TINY, 0)
    model = nnx.merge(graphdef, params, stats)
    for call in (model.encode, model):
        with pytest.raises(ValueError, match=r"DCAE.encode got uint8 values; it expects float images in \[-1, 1\]: "
                                             r"convert with x.astype\(float32\) / 127.5 - 1"):
            call(jnp.asarray(UINT8))
    with pytest.raises(ValueError, match="DCAE.decode got int32 values; it expects float latents"):
        model.decode(jnp.zeros((1, 4, 4, 4), jnp.int32))
    x = jnp.asarray(to_signed(UINT8))
    for fn in (metrics.psnr, metrics.ssim):
        with pytest.raises(ValueError, match="quantize_uint8.*got uint8.*ssim_uint8"):
            fn(jnp.asarray(UINT8), x)
    with pytest.raises(ValueError, match=r"reconstruction_metrics \(images\) got uint8"):
        metrics.reconstruction_metrics(np.asarray(x), UINT8)
    with pytest.raises(ValueError, match="lpips got uint8"):
        perceptual.lpips({}, UINT8, x)
    with pytest.raises(ValueError, match="to_signed expects uint8 images in \\[0, 255\\], got float32"):
        to_signed(np.asarray(x))
    tx = optax.sgd(0.1)  # the trainer's images: refused while tracing the step
    with pytest.raises(ValueError, match="DCAE.encode got uint8"):
        make_step(graphdef, tx)(params, stats, tx.init(params), jnp.asarray(UINT8))


def test_dcae_unknown_names_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown DC-AE config 'dc-ae-f16c4'; known: \['dc-ae-f128c512-in-1.0'"):
        DCAE.from_pretrained(tmp_path, config="dc-ae-f16c4")  # checked before the files
    with pytest.raises(ValueError, match="unknown image 'lena'; known:"):
        load_image("lena")
    from experiments.dcae_adaptation import Config as AdaptationConfig
    from experiments.dcae_pretrained import Config as PretrainedConfig

    with pytest.raises(ValueError, match=r"loss='l2'; known: \['l1', 'l1\+lpips', 'l1\+mse'\]"):
        AdaptationConfig(loss="l2").validate()
    with pytest.raises(ValueError, match="unknown DC-AE config 'f32'"):
        PretrainedConfig(model="f32", ckpt=str(tmp_path)).validate()
