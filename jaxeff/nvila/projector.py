"""NVILA's vision->language projectors (NVlabs/VILA `llava/model/multimodal_projector/base_projector.py:145-174`
at b760c34), with the official `layers.N` parameter names: index N is the position in the official
`nn.Sequential`, so `layers.1.weight` is our `layers["1"].scale`, and parameter-free steps (space-to-channel,
GELU) leave gaps in the numbering.

- `mlp_downsample` (= `mlp_downsample_2x2_fix`): 2x2 space-to-channel -> LayerNorm -> Linear -> GELU -> Linear.
- `mlp_downsample_3x3_fix`: zero-pad to a multiple of 3, 3x3 space-to-channel -> LayerNorm -> Linear(-> 3*C)
  -> GELU -> LayerNorm -> Linear -> GELU -> Linear (32x32 -> 11x11 = 121 tokens per tile).
LayerNorms use torch's default eps 1e-5; GELU is the exact erf form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxeff.models.vit import space_to_channel
from jaxeff.nvila.features import tile_grid

# type -> (space-to-channel factor, [(index, kind)]); `mm` is mm_hidden_size, `d` the LLM width.
_SPECS = {
    "mlp_downsample": (2, [(1, "ln", "4mm"), (2, "linear", "4mm", "d"), (3, "gelu"), (4, "linear", "d", "d")]),
    "mlp_downsample_3x3_fix": (3, [(1, "ln", "9mm"), (2, "linear", "9mm", "3mm"), (3, "gelu"), (4, "ln", "3mm"),
                                   (5, "linear", "3mm", "d"), (6, "gelu"), (7, "linear", "d", "d")]),
}
_SPECS["mlp_downsample_2x2_fix"] = _SPECS["mlp_downsample"]
PROJECTOR_TYPES = tuple(_SPECS)


class Projector(nnx.Module):
    """`projector(x [N, g*g, mm_hidden])` -> [N, ceil(g/k)^2, llm_hidden] (k = 2 or 3)."""

    def __init__(self, kind: str, mm_hidden_size: int, llm_hidden_size: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        if kind not in _SPECS:
            raise ValueError(f"mm_projector_type {kind!r} not supported; supported: {PROJECTOR_TYPES}")
        self.kind = kind
        self.merge, spec = _SPECS[kind]
        widths = {"4mm": 4 * mm_hidden_size, "9mm": 9 * mm_hidden_size, "3mm": 3 * mm_hidden_size,
                  "d": llm_hidden_size}
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        layers = {}
        for index, op, *dims in spec:
            if op == "ln":
                layers[str(index)] = nnx.LayerNorm(widths[dims[0]], epsilon=1e-5, **kw)
            elif op == "linear":
                layers[str(index)] = nnx.Linear(widths[dims[0]], widths[dims[1]], **kw)
        self.layers = nnx.Dict(layers)
        self.order = tuple((str(i), op) for i, op, *_ in spec)

    def tokens_out(self, tokens_in: int) -> int:
        return (-(-tile_grid(tokens_in) // self.merge)) ** 2

    def __call__(self, x):
        x = space_to_channel(x, tile_grid(x.shape[1]), self.merge)
        for name, op in self.order:
            x = jax.nn.gelu(x, approximate=False) if op == "gelu" else self.layers[name](x)
        return x


def _torch_key(path: tuple) -> tuple[str, bool]:
    """('layers', '2', 'kernel') -> ('layers.2.weight', transposed)."""
    *mods, leaf = (str(p) for p in path)
    name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join(mods + [name]), leaf == "kernel"


def load_projector_state(projector: Projector, tensors: dict[str, np.ndarray], source: str = "mm_projector"):
    """Fill `projector` in place from an official `mm_projector/model.safetensors` state dict; raises naming any
    missing, unexpected or mis-shaped key."""
    state = nnx.state(projector, nnx.Param)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    new, problems, used = {}, [], set()
    for path, current in flat.items():
        key, transpose = _torch_key(path)
        if key not in tensors:
            problems.append(f"missing {key}")
            continue
        arr = np.asarray(tensors[key])
        arr = arr.T if transpose else arr
        if arr.shape != tuple(current.shape):
            problems.append(f"{key}: checkpoint {arr.shape} vs model {tuple(current.shape)}")
            continue
        new[path] = jnp.asarray(arr, current.dtype)
        used.add(key)
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - used)]
    if problems:
        raise ValueError(f"{source} does not fit a {projector.kind} projector: " + "; ".join(problems))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new))
    nnx.update(projector, state)
    return projector


def projector_state_dict(projector: Projector) -> dict[str, np.ndarray]:
    """The official (torch-named, [out, in] weights) state dict of `projector`."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(projector, nnx.Param)))
    out = {}
    for path, value in flat.items():
        key, transpose = _torch_key(path)
        arr = np.asarray(value)
        out[key] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def load_projector(directory, dtype=jnp.float32) -> Projector:
    """An official `mm_projector/` folder (config.json + model.safetensors) -> `Projector`; the widths are read
    from the checkpoint (`layers.1` is the LayerNorm over k*k*mm_hidden channels, the last Linear gives D)."""
    import json
    from pathlib import Path

    from jaxeff.io import load_checkpoint_dir

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (expected an mm_projector folder)")
    kind = json.loads(cfg_path.read_text()).get("mm_projector_type")
    if kind not in _SPECS:
        raise ValueError(f"{cfg_path}: mm_projector_type {kind!r} not supported; supported: {PROJECTOR_TYPES}")
    tensors = load_checkpoint_dir(directory)
    merge, spec = _SPECS[kind]
    last = max(i for i, op, *_ in spec if op == "linear")
    mm_hidden = tensors["layers.1.weight"].shape[0] // (merge * merge)
    llm_hidden = tensors[f"layers.{last}.weight"].shape[0]
    projector = nnx.eval_shape(lambda: Projector(kind, mm_hidden, llm_hidden, rngs=nnx.Rngs(0), dtype=dtype,
                                                 param_dtype=dtype))
    return load_projector_state(projector, tensors, source=str(directory))
