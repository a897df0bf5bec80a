"""Loading the released LPD checkpoints and the LlamaGen VQ tokenizer into the NNX modules.

Formats: safetensors (read without torch), or the official torch pickles: LPD `{"model": state_dict, ...}`
(`main.py` reads `torch.load(path)["model"]`; training checkpoints also carry optimizer/epoch/scaler/args) and
LlamaGen `vq_ds16_c2i.pt` (`ckpt["model"]` if present, else a bare state dict). Pickles need the optional torch.

Our module paths are the official keys (`blocks.3.attn.qkv`, `encoder.conv_blocks.1.res.0.conv1`, ...) with the
leaf renamed (kernel/scale/embedding -> weight) and Linear / Conv kernels transposed from torch's layout; the shared
`jaxeff.io.state_dict.load_mapped` names every missing, unexpected and shape-mismatched key.
`quantize.codebook_used` (a usage counter) is ignored.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxeff.io import hub
from jaxeff.io.safetensors import load_file
from jaxeff.io.state_dict import CheckpointMismatchError, load_mapped, to_torch, torch_key, torch_layout
from jaxeff.nn.resample import bicubic_matrix

_IGNORED = ("quantize.codebook_used",)
official_key = torch_key  # our module paths are the official names


_WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


def resolve(source: str | Path) -> Path:
    """A local path, or `hf:<owner>/<repo>[/<file>]` downloaded by `jaxeff.io.hub.resolve` (needs a network), e.g.
    `hf:mit-han-lab/lpd_l_256` (the repo's one .pth / .safetensors file) or
    `hf:FoundationVision/LlamaGen/vq_ds16_c2i.pt`."""
    if not hub.is_hub_name(source) or hub.parse(source)[2]:
        return hub.resolve(source)
    root = hub.resolve(source, allow_patterns=[f"*{s}" for s in _WEIGHT_SUFFIXES])
    files = sorted(p for p in root.rglob("*") if p.name.endswith(_WEIGHT_SUFFIXES))
    if len(files) != 1:
        raise ValueError(f"{source!r}: the repo holds {len(files)} weight files {[p.name for p in files]}; "
                         f"name one as {source}/<file>")
    return files[0]


def _torch_load(path: Path, weights_only: bool):
    """torch.load on the CPU. With `weights_only` the safe unpickler also accepts `argparse.Namespace` (the `args`
    that official training checkpoints carry, `util/misc.py:306-319`; its fields are plain values), so those load
    without running arbitrary pickle code; anything else non-tensor is refused with the global named."""
    import argparse

    import torch

    if not weights_only:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError subclasses that differ between versions
        if "weights only" not in str(e).lower():
            raise ValueError(f"{path}: not a readable torch pickle ({type(e).__name__}: {e}); LPD / VQ checkpoints "
                             "are .safetensors files or torch .pth / .pt pickles") from e
        raise ValueError(
            f"{path}: the safe loader (torch.load weights_only=True, argparse.Namespace allowed) refused it: {e}\n"
            "Pass weights_only=False only for a file you trust (e.g. downloaded from the official mit-han-lab/lpd_* "
            "or FoundationVision/LlamaGen repos): it runs the pickle's code.") from e


def read_state_dict(path: str | Path, *, weights_only: bool = True) -> dict[str, np.ndarray]:
    """Official tensors of a `.safetensors` file or a torch pickle (`{"model": sd}` or a bare state dict); `path`
    may be `hf:...` (see `resolve`).

    Pickles load with torch's safe unpickler (`weights_only=True`), which here also accepts the `argparse.Namespace`
    `args` of official training checkpoints; a file holding other objects raises ValueError naming them, and
    `weights_only=False` (arbitrary code: trusted files only) reads it anyway."""
    path = resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{path} is a torch pickle; install torch to read it (or convert it to safetensors)") from e
    ckpt = _torch_load(path, weights_only)
    sd = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(sd).__name__}")
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def load_into(module, tensors: dict, *, source: str = "checkpoint", dtype=jnp.float32):
    """Fill `module` (possibly abstract, from nnx.eval_shape) from an official state dict; returns the module."""
    return load_mapped(module, tensors, lambda p: (official_key(p), torch_layout(p)), source=source, what="the model",
                       ignore=lambda k: k in _IGNORED, dtype=dtype)


def state_dict(module) -> dict[str, np.ndarray]:
    """Official-layout numpy state dict of `module`'s parameters (for saving as safetensors)."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    return {official_key(p): np.ascontiguousarray(to_torch(np.asarray(v), str(p[-1]))) for p, v in flat.items()}


def lpd_config_from_state_dict(tensors: dict, *, num_heads: int | None = None, **overrides):
    """LPDConfig read off the tensor shapes; heads are not stored, so `num_heads` defaults to dim // 64 (the
    released L / XL / XXL all use head_dim 64)."""
    from jaxeff.lpd.config import LPDConfig

    for key in ("token_emb.weight", "class_emb.weight", "pos_embed"):
        if key not in tensors:
            raise CheckpointMismatchError(f"not an LPD state dict: no {key!r} (keys start {sorted(tensors)[:5]})")
    vocab, dim = tensors["token_emb.weight"].shape
    n = tensors["pos_embed"].shape[1] - 1
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise CheckpointMismatchError(f"pos_embed has {n} + 1 rows; {n} is not a square token grid")
    depth = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    return LPDConfig(dim=dim, depth=depth, num_heads=num_heads or dim // 64, vocab_size=vocab,
                     num_classes=tensors["class_emb.weight"].shape[0], grid_size=grid, **overrides)


def interpolate_pos_embed(pos_embed, grid_size: int) -> np.ndarray:
    """Resize a `pos_embed` [1, g*g + 1, D] to [1, grid_size**2 + 1, D] as the official fine-tuning does when a
    checkpoint's grid differs from the model's (256px -> 512px: 16x16 -> 32x32; `main.py:132-153, 277-279`):
    row 0 (class slot) kept, the grid rows resized bicubically (torch's kernel, A = -0.75, align_corners=False).
    float32 out. Raises ValueError if the rows are not 1 + a square grid."""
    pe = np.asarray(pos_embed, np.float64)
    n = pe.shape[1] - 1
    g = int(round(n**0.5))
    if pe.ndim != 3 or pe.shape[0] != 1 or g * g != n or grid_size < 1:
        raise ValueError(f"pos_embed must be [1, g*g + 1, D] and grid_size >= 1, got {pe.shape} and {grid_size}")
    w = bicubic_matrix(g, grid_size).astype(np.float64)
    grid = np.einsum("ai,bj,ijd->abd", w, w, pe[0, 1:].reshape(g, g, -1)).reshape(1, grid_size**2, -1)
    return np.concatenate([pe[:, :1], grid], axis=1).astype(np.float32)


def load_lpd(path: str | Path, config=None, *, num_heads: int | None = None, weights_only: bool = True,
             dtype=jnp.float32, **overrides):
    """An `LPD` model from a released checkpoint (`.pth` pickle or `.safetensors`); the config comes from the
    tensor shapes unless given (`overrides` e.g. proj_dropout=0.0 go into the inferred config). A `config` whose
    grid differs from the checkpoint's gets the checkpoint's `pos_embed` resized bicubically, as the official
    `--pretrained_ckpt` path does (`interpolate_pos_embed`; how L-512 / XL-512 were fine-tuned from 256px). The
    released 512px files were fine-tuned at 32x32 (`scripts/train/lpd_*_512.sh`), so their 1025 rows should load
    as they are, grid read off the shapes (not yet checked on the real files: no network here)."""
    from jaxeff.lpd.config import LPDConfig
    from jaxeff.lpd.model import LPD

    if config is not None and not isinstance(config, LPDConfig):
        raise TypeError(f"config must be an LPDConfig (e.g. jaxeff.lpd.preset('lpd_l_256')) or None, got "
                        f"{type(config).__name__} {config!r}")
    tensors = read_state_dict(path, weights_only=weights_only)
    cfg = config or lpd_config_from_state_dict(tensors, num_heads=num_heads, **overrides)
    if "pos_embed" in tensors and tensors["pos_embed"].shape[1] != cfg.num_tokens + 1:
        tensors = tensors | {"pos_embed": interpolate_pos_embed(tensors["pos_embed"], cfg.grid_size)}
    model = nnx.eval_shape(lambda: LPD(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    return load_into(model, tensors, source=str(path), dtype=dtype)
