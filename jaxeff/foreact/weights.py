"""Loading ForeAct's released generator (`VisualForesight.save_pretrained`: `model.safetensors` or shards).

Key layout (`vf.py:28-140`): `transformer.<diffusers SanaTransformer2DModel key>`, `view_embedding.weight` for
multi-view models, `vae.<diffusers AutoencoderDC key>` and `mllm_backbone.<transformers Gemma2ForCausalLM key>` (its
`lm_head` is an Identity, so absent). `load_generator` fills the transformer (+ view embedding) and names every key
that does not fit; `split_released` hands the `vae.*` and `mllm_backbone.*` parts to their own loaders
(`jaxeff.dcae`, the text decoder).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.foreact.config import SANA_1600M_512, SanaConfig
from jaxeff.foreact.generator import ForesightGenerator
from jaxeff.io import hub
from jaxeff.io.safetensors import load_checkpoint_dir, load_file
from jaxeff.io.state_dict import load_mapped, to_torch, torch_key, torch_layout

RELEASED = "hf:mit-han-lab/foreact-pretrained"
PREFIXES = ("transformer.", "view_embedding.", "vae.", "mllm_backbone.")


def read_tensors(source: str | Path) -> tuple[Path, dict[str, np.ndarray]]:
    """(local directory, every tensor) of a `VisualForesight` checkpoint: a directory with `model.safetensors` (or a
    sharded index), a single `.safetensors` file, or an `hf:` name (downloaded through `jaxeff.io.hub.resolve`)."""
    path = hub.resolve(source, allow_patterns=["*.json", "*.safetensors"]) if hub.is_hub_name(source) \
        else Path(source)
    if path.is_file():
        return path.parent, load_file(path)
    return path, load_checkpoint_dir(path)


def split_released(tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{"generator": transformer.* + view_embedding.*, "vae": vae.* with the prefix removed, "mllm_backbone": the
    same}; raises ValueError naming keys under none of the known prefixes."""
    other = sorted(k for k in tensors if not k.startswith(PREFIXES))
    if other:
        raise ValueError(f"keys outside {PREFIXES}: {other[:20]}{' ...' if len(other) > 20 else ''}")
    gen = {k: v for k, v in tensors.items() if k.startswith(PREFIXES[:2])}
    sub = {p[:-1]: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)} for p in PREFIXES[2:]}
    return {"generator": gen, **sub}


def config_for(directory: Path, tensors: dict[str, np.ndarray], config: SanaConfig | None) -> SanaConfig:
    """The config: `config` if given, else `transformer/config.json` beside the weights, else SANA-1600M-512;
    num_views from the checkpoint's `view_embedding.weight` rows (1 without one)."""
    views = tensors["view_embedding.weight"].shape[0] if "view_embedding.weight" in tensors else 1
    if config is not None:
        if config.num_views != views:
            raise ValueError(f"config.num_views={config.num_views} but the checkpoint has {views} view(s)")
        return config
    cfg_file = directory / "transformer" / "config.json"
    if cfg_file.exists():
        return SanaConfig.from_diffusers(json.loads(cfg_file.read_text()), num_views=views)
    return SanaConfig(**{**SANA_1600M_512.__dict__, "num_views": views})


def _key_of(path: tuple):
    return torch_key(path), torch_layout(path)


def load_generator(source: str | Path, *, config: SanaConfig | None = None, dtype=jnp.float32) -> ForesightGenerator:
    """The generator (transformer + view embedding) of a released checkpoint (`load_generator(RELEASED)` downloads
    `mit-han-lab/foreact-pretrained`). `vae.*` / `mllm_backbone.*` keys are left to their loaders; a missing,
    mis-shaped or unknown generator key raises `jaxeff.io.state_dict.CheckpointMismatchError` naming it."""
    directory, tensors = read_tensors(source)
    gen = split_released(tensors)["generator"]
    return generator_from_tensors(gen, config_for(directory, gen, config), dtype=dtype, source=str(source))


def generator_from_tensors(tensors: dict[str, np.ndarray], config: SanaConfig, *, dtype=jnp.float32,
                           source: str = "state dict") -> ForesightGenerator:
    """A generator filled from `transformer.*` (+ `view_embedding.weight` when config.num_views > 1) tensors;
    CheckpointMismatchError names every key that does not fit."""
    model = nnx.eval_shape(lambda: ForesightGenerator(config, rngs=nnx.Rngs(0), dtype=dtype))
    return load_mapped(model, tensors, _key_of, source=source, what=f"ForeAct generator {config}")


def state_dict(model: ForesightGenerator) -> dict[str, np.ndarray]:
    """The generator's tensors in the released layout (torch names and layouts), e.g. to write tiny checkpoints."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {torch_key(p): to_torch(np.asarray(v.get_value()), str(p[-1])) for p, v in flat}


def load_vae(tensors: dict[str, np.ndarray], config: str = "dc-ae-f32c32-sana-1.0", *, dtype=jnp.float32):
    """The DC-AE of a released checkpoint from its `vae.*` tensors (prefix removed, diffusers `AutoencoderDC` names;
    SANA-1600M-512's VAE is dc-ae-f32c32-sana-1.0, scaling factor 0.41407), as a `jaxeff.dcae.DCAE`. ForeAct runs
    it as diffusers' `AutoencoderDC`, whose linear attention is float32 whatever the dtype (`fp32_attention=True`)."""
    from jaxeff.dcae import DCAE, get_config, load_torch_state

    cfg = get_config(config) if isinstance(config, str) else config
    model = nnx.eval_shape(lambda: DCAE(cfg, rngs=nnx.Rngs(0), dtype=dtype, fp32_attention=True))
    load_torch_state(model, tensors, dtype=dtype, source="vae.*")
    return model


def load_released(source: str | Path = RELEASED, *, config: SanaConfig | None = None,
                  vae_config="dc-ae-f32c32-sana-1.0",
                  dtype=jnp.float32):
    """(generator, DC-AE or None, `mllm_backbone.*` tensors (prefix removed; for `TextEncoder.from_pretrained(...,
    tensors=...)`)) of a released `VisualForesight` checkpoint; the VAE is None when the checkpoint has no `vae.*`."""
    directory, tensors = read_tensors(source)
    parts = split_released(tensors)
    gen = generator_from_tensors(parts["generator"], config_for(directory, parts["generator"], config), dtype=dtype,
                                 source=str(source))
    vae = load_vae(parts["vae"], vae_config, dtype=dtype) if parts["vae"] else None
    return gen, vae, parts["mllm_backbone"]
