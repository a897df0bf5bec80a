"""DC-AE: deep compression autoencoders (MIT HAN Lab, arXiv 2410.10733) in Flax NNX, loading the released weights."""

from jaxeff.dcae.config import CONFIGS, DCAEConfig, get_config
from jaxeff.dcae.model import DCAE, jit_method, pixel_shuffle, pixel_unshuffle
from jaxeff.dcae.weights import WHERE_TO_GET, original_to_diffusers, torch_state

__all__ = [
    "CONFIGS",
    "DCAE",
    "DCAEConfig",
    "WHERE_TO_GET",
    "get_config",
    "jit_method",
    "original_to_diffusers",
    "pixel_shuffle",
    "pixel_unshuffle",
    "torch_state",
]
