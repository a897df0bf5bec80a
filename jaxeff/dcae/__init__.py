"""DC-AE: deep compression autoencoders (MIT HAN Lab, arXiv 2410.10733) in Flax NNX, loading the released weights.

    from jaxeff.dcae import DCAE, jit_method
    model = DCAE.from_pretrained("hf:mit-han-lab/dc-ae-f32c32-in-1.0-diffusers")  # or a local diffusers / original dir
    z = jit_method(model, "encode", scaled=True)(images)            # [B, H, W, 3] in [-1, 1] -> [B, H/32, W/32, 32]
    x = jit_method(model, "decode", scaled=True)(z)

Released architectures: `CONFIGS` / `get_config(name)`; random weights for training: `DCAE.random(config, seed)`;
`model.train()` puts the bn2d layers of the in/mix decoders in training mode (`training.make_step` carries their
statistics). Reconstruction metrics as the official evaluator computes them (PSNR / SSIM on uint8, LPIPS-AlexNet
from a local weights file): `jaxeff.dcae.metrics`. Parity with diffusers' `AutoencoderDC` (float32, eval and
BatchNorm training mode, relative error < 1e-4) and with torchmetrics' SSIM / LPIPS is tested on CPU. Images are
float in [-1, 1]; uint8 images raise a ValueError. Official behaviour, differences and measurements: README.md here.
"""

from jaxeff.dcae.config import CONFIGS, DCAEConfig, get_config
from jaxeff.dcae.model import DCAE, jit_method, pixel_shuffle, pixel_unshuffle
from jaxeff.dcae.weights import WHERE_TO_GET, load_torch_state, original_to_diffusers, torch_state

__all__ = [
    "CONFIGS",
    "DCAE",
    "DCAEConfig",
    "WHERE_TO_GET",
    "get_config",
    "jit_method",
    "load_torch_state",
    "original_to_diffusers",
    "pixel_shuffle",
    "pixel_unshuffle",
    "torch_state",
]
