"""NVILA (NVlabs/VILA) in JAX: Dynamic-S2 / dynamic tiling, scale merge, projectors, and the VLM on the shared
SigLIP ViT and Qwen2 decoder. `jaxeff.nvila.from_pretrained(dir)` loads the released layout."""

from jaxeff.nvila.model import NVILA, NVILAConfig, NVILAModel, from_pretrained, save_pretrained
from jaxeff.nvila.projector import PROJECTOR_TYPES, load_projector, make_projector

__all__ = ["NVILA", "NVILAConfig", "NVILAModel", "from_pretrained", "save_pretrained", "make_projector",
           "PROJECTOR_TYPES", "load_projector"]
