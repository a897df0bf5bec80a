"""Reading released DC-AE checkpoints into the NNX model.

Two layouts exist: the original mit-han-lab/efficientvit state dict (`model.safetensors`, keys like
`encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight`) and diffusers' `AutoencoderDC`
(`config.json` + `diffusion_pytorch_model.safetensors`, keys like `encoder.down_blocks.3.0.attn.to_q.weight`).
Original keys are renamed to diffusers keys (the same mapping as diffusers' single-file converter), and diffusers
keys equal the NNX parameter paths, so loading is a rename plus a layout transpose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.dcae.config import CONFIGS, DCAEConfig, get_config
from jaxeff.io.safetensors import load_checkpoint_dir, load_file
from jaxeff.io.state_dict import load_mapped

WHERE_TO_GET = (
    "Released DC-AE weights: https://huggingface.co/collections/mit-han-lab/dc-ae-670085b9400ad7197bb1009b "
    "(original format: mit-han-lab/<name>/model.safetensors; diffusers format: mit-han-lab/<name>-diffusers, "
    f"config.json + diffusion_pytorch_model.safetensors). Names: {', '.join(sorted(CONFIGS))}."
)

# Ordered renames of original-format keys (after dropping the `main.` / `op_list.` wrapper segments).
_RENAMES: list[tuple[str, str]] = [
    (r"^encoder\.stages\.", "encoder.down_blocks."),
    (r"^decoder\.stages\.", "decoder.up_blocks."),
    (r"\.context_module\.", ".attn."),
    (r"\.local_module\.", ".conv_out."),
    (r"\.aggreg\.(\d+)\.0\.", r".to_qkv_multiscale.\1.proj_in."),
    (r"\.aggreg\.(\d+)\.1\.", r".to_qkv_multiscale.\1.proj_out."),
    (r"\.inverted_conv\.conv\.", ".conv_inverted."),
    (r"\.depth_conv\.conv\.", ".conv_depth."),
    (r"\.point_conv\.conv\.", ".conv_point."),
    (r"\.point_conv\.norm\.", ".norm."),
    (r"\.conv1\.conv\.", ".conv1."),
    (r"\.conv2\.conv\.", ".conv2."),
    (r"\.conv2\.norm\.", ".norm."),
    (r"\.proj\.norm\.", ".norm_out."),
    (r"\.proj\.conv\.weight$", ".to_out.weight"),
    # down/up-sampling layers wrap their conv once more (ConvPixel(Un)Shuffle, InterpolateConv)
    (r"(_blocks\.\d+\.\d+\.)conv\.conv\.", r"\1conv."),
    (r"^encoder\.project_in\.conv\.conv\.", "encoder.conv_in.conv."),
    (r"^encoder\.project_in\.conv\.", "encoder.conv_in."),
    (r"^encoder\.project_out\.0\.conv\.", "encoder.conv_out."),
    (r"^decoder\.project_in\.conv\.", "decoder.conv_in."),
    (r"^decoder\.project_out\.0\.", "decoder.norm_out."),
    (r"^decoder\.project_out\.2\.conv\.conv\.", "decoder.conv_out.conv."),
    (r"^decoder\.project_out\.2\.conv\.", "decoder.conv_out."),
]


def original_to_diffusers(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename an original-format DC-AE state dict to diffusers `AutoencoderDC` keys (fused qkv split in thirds)."""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        new = re.sub(r"\.(?:main|op_list)(?=\.)", "", key)
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        if new.endswith(".qkv.conv.weight"):
            parent = new.removesuffix(".qkv.conv.weight")
            q, k, v = np.split(np.asarray(value), 3, axis=0)
            for name, part in zip("qkv", (q, k, v)):
                out[f"{parent}.to_{name}.weight"] = part.reshape(part.shape[:2])
            continue
        if new.endswith(".to_out.weight"):
            value = np.asarray(value).reshape(value.shape[:2])
        out[new] = value
    return out


def is_original_format(tensors: dict[str, np.ndarray]) -> bool:
    return any(k.startswith(("encoder.stages.", "encoder.project_in.")) for k in tensors)


def _config_from(path: Path, config: DCAEConfig | str | None) -> DCAEConfig:
    if isinstance(config, DCAEConfig):
        return config
    if isinstance(config, str):
        return get_config(config)
    directory = path if path.is_dir() else path.parent
    cfg_file = directory / "config.json"
    if cfg_file.exists():
        meta = json.loads(cfg_file.read_text())
        if "model_name" in meta:  # efficientvit DCAE_HF hub config
            return get_config(meta["model_name"])
    for candidate in (directory.name, path.stem):
        name = candidate.removesuffix("-diffusers")
        if name in CONFIGS:
            return CONFIGS[name]
    raise ValueError(
        f"{path}: original-format DC-AE weights carry no architecture; pass config=<DCAEConfig or name> "
        f"(one of {sorted(CONFIGS)}), or name the directory after the model"
    )


def read_checkpoint(path: str | Path, config: DCAEConfig | str | None = None):
    """(config, tensors in diffusers naming and torch layout) for a diffusers dir, original dir, or a file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. {WHERE_TO_GET}")
    if path.is_dir():
        has_diffusers = any(path.glob("diffusion_pytorch_model.safetensors*"))
        if has_diffusers:
            tensors = load_checkpoint_dir(path, stem="diffusion_pytorch_model")
            if config is None:
                cfg_file = path / "config.json"
                if not cfg_file.exists():
                    raise FileNotFoundError(f"{path}: diffusers-format weights without config.json; pass config=")
                config = DCAEConfig.from_diffusers(json.loads(cfg_file.read_text()))
        elif any(path.glob("model.safetensors*")):
            tensors = load_checkpoint_dir(path, stem="model")
        else:
            raise FileNotFoundError(
                f"{path}: no diffusion_pytorch_model.safetensors or model.safetensors inside. {WHERE_TO_GET}"
            )
    else:
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file or a checkpoint directory")
        tensors = load_file(path)
    if is_original_format(tensors):
        return _config_from(path, config), original_to_diffusers(tensors)
    if config is None:
        cfg_file = path.parent / "config.json"
        if not cfg_file.exists():
            raise ValueError(f"{path}: diffusers-format weights need config= or a config.json beside them")
        config = DCAEConfig.from_diffusers(json.loads(cfg_file.read_text()))
    return _config_from(path, config), tensors


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def load_torch_state(model: nnx.Module, tensors: dict[str, np.ndarray], *, dtype=jnp.float32, source: str = "") -> None:
    """Fill `model` (real or `nnx.eval_shape` abstract) in place from a diffusers-named torch-layout state dict
    (parameters and BatchNorm running statistics; `num_batches_tracked` counters are ignored)."""
    load_mapped(model, tensors, lambda p: (".".join(map(str, p)), _from_torch_layout), source=f"checkpoint {source}",
                what="the DC-AE config", ignore=lambda k: k.endswith(".num_batches_tracked"), dtype=dtype,
                variables=...)


def torch_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters in diffusers naming and torch layout (what `load_torch_state` reads)."""
    _, state = nnx.split(model)
    return {".".join(map(str, path)): np.ascontiguousarray(_to_torch_layout(np.asarray(v[...])))
            for path, v in nnx.to_flat_state(state)}
