"""NVILA's vision->language projectors with the official checkpoint keys (NVlabs/VILA
`llava/model/multimodal_projector/base_projector.py:145-174` at b760c34). The computation is the shared
`jaxeff.models.vit.DownsampleProjector`; here are the official types and the `layers.N` names (N = position in the
official `nn.Sequential`; parameter-free steps, space-to-channel and GELU, leave gaps in the numbering).

- `mlp_downsample` (= `mlp_downsample_2x2_fix`): 2x2 space-to-channel -> LayerNorm (`layers.1`) -> Linear
  (`layers.2`) -> GELU -> Linear (`layers.4`).
- `mlp_downsample_3x3_fix`: zero-pad to a multiple of 3, 3x3 space-to-channel -> LayerNorm (`layers.1`) -> Linear
  to 3*C (`layers.2`) -> GELU -> LayerNorm (`layers.4`) -> Linear (`layers.5`) -> GELU -> Linear (`layers.7`);
  32x32 -> 11x11 = 121 tokens per tile.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxeff.io.state_dict import load_mapped
from jaxeff.models.vit import DownsampleProjector

# type -> (space-to-channel factor, middle width as a multiple of mm_hidden_size (None = no middle block))
_TYPES = {"mlp_downsample": (2, None), "mlp_downsample_2x2_fix": (2, None), "mlp_downsample_3x3_fix": (3, 3)}
PROJECTOR_TYPES = tuple(_TYPES)
_SIGLIP_GRID = 32  # a 448 tile in 14-pixel patches


def make_projector(kind: str, mm_hidden_size: int, llm_hidden_size: int, grid: int = _SIGLIP_GRID, *,
                   rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32) -> DownsampleProjector:
    """The projector of an official `mm_projector_type` for [N, grid*grid, mm_hidden_size] tower features."""
    if kind not in _TYPES:
        raise ValueError(f"mm_projector_type {kind!r} not supported; supported: {PROJECTOR_TYPES}")
    merge, mid = _TYPES[kind]
    return DownsampleProjector(mm_hidden_size, llm_hidden_size, grid, merge, mid_dim=mid and mid * mm_hidden_size,
                               rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def _official_index(projector: DownsampleProjector) -> dict[str, str]:
    if projector.mid_fc is None:
        return {"norm": "1", "fc1": "2", "fc2": "4"}
    return {"norm": "1", "fc1": "2", "mid_norm": "4", "mid_fc": "5", "fc2": "7"}


def _torch_key(index: dict[str, str], path: tuple) -> tuple[str, bool]:
    """(index, ('fc1', 'kernel')) -> ('layers.2.weight', transposed)."""
    module, leaf = (str(p) for p in path)
    return f"layers.{index[module]}.{'bias' if leaf == 'bias' else 'weight'}", leaf == "kernel"


def load_projector_state(projector: DownsampleProjector, tensors: dict[str, np.ndarray],
                         source: str = "mm_projector") -> DownsampleProjector:
    """Fill `projector` in place from an official `mm_projector/model.safetensors` state dict; raises naming any
    missing, unexpected or mis-shaped key."""
    index = _official_index(projector)

    def key_of(path):
        key, transpose = _torch_key(index, path)
        return key, (np.transpose if transpose else None)

    what = f"a {projector.merge}x{projector.merge} projector" + (" with a middle block" if len(index) > 3 else "")
    return load_mapped(projector, tensors, key_of, source=source, what=what)


def projector_state_dict(projector: DownsampleProjector) -> dict[str, np.ndarray]:
    """The official (torch-named, [out, in] weights) state dict of `projector`."""
    index = _official_index(projector)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(projector, nnx.Param)))
    out = {}
    for path, value in flat.items():
        key, transpose = _torch_key(index, path)
        arr = np.asarray(value)
        out[key] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def load_projector(directory, grid: int = _SIGLIP_GRID, dtype=jnp.float32) -> DownsampleProjector:
    """An official `mm_projector/` folder (config.json + model.safetensors) -> its projector for grid x grid
    tiles; the widths are read from the checkpoint (`layers.1` is the LayerNorm over
    k*k*mm_hidden channels, the last Linear gives D)."""
    from jaxeff.io import load_checkpoint_dir

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (expected an mm_projector folder)")
    kind = json.loads(cfg_path.read_text()).get("mm_projector_type")
    if kind not in _TYPES:
        raise ValueError(f"{cfg_path}: mm_projector_type {kind!r} not supported; supported: {PROJECTOR_TYPES}")
    tensors = load_checkpoint_dir(directory)
    merge, mid = _TYPES[kind]
    last = "layers.7.weight" if mid else "layers.4.weight"
    if "layers.1.weight" not in tensors or last not in tensors:
        raise ValueError(f"{directory}: no layers.1.weight / {last} for a {kind} projector; keys: {sorted(tensors)}")
    mm_hidden = tensors["layers.1.weight"].shape[0] // (merge * merge)
    llm_hidden = tensors[last].shape[0]
    projector = nnx.eval_shape(lambda: make_projector(kind, mm_hidden, llm_hidden, grid, rngs=nnx.Rngs(0),
                                                      dtype=dtype, param_dtype=dtype))
    return load_projector_state(projector, tensors, source=str(directory))
