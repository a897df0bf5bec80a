"""LPD: locality-aware parallel decoding for autoregressive image generation (mit-han-lab/lpd, arXiv 2507.01957).

- `config`: `LPDConfig` and the released L / XL / XXL presets.
- `model`: the flexible parallelized AR decoder (training forward, group-id mask).
- `sampling`: K-step KV-cached decoding in one compiled program, CFG ramp, temperature; `generate_images` (orders,
  decoding and the VQ decode end to end).
- `schedules`: the official group-size tables.
- `weights`: loaders for the released checkpoints (safetensors, torch pickles).
"""

from jaxeff.lpd.config import PRESETS, LPDConfig, preset
from jaxeff.lpd.model import LPD
from jaxeff.lpd.sampling import generate, generate_images
from jaxeff.lpd.weights import load_lpd

__all__ = ["LPDConfig", "PRESETS", "preset", "LPD", "generate", "generate_images", "load_lpd"]
