"""Hugging Face-format decoder checkpoints (config.json + safetensors, sharded or not) <-> `jaxeff.models.llama`
(llama, mistral, qwen2) and `jaxeff.models.gemma2` (gemma2), chosen by config.json's model_type. Both decoders use
transformers' parameter names, so one key mapping serves them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxeff.io import hub
from jaxeff.io.safetensors import load_checkpoint_dir, save_checkpoint_dir
from jaxeff.io.state_dict import load_mapped
from jaxeff.models.gemma2 import Gemma2, Gemma2Config
from jaxeff.models.llama import Llama, LlamaConfig, stop_id_tuple

Decoder = Llama | Gemma2
DecoderConfig = LlamaConfig | Gemma2Config

GENERATION_CONFIG = "generation_config.json"
# Buffers some exporters write that carry no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_key(path: tuple) -> tuple[str, bool]:
    """Our parameter path -> (Hugging Face key, whether the array is transposed)."""
    *mods, leaf = (str(p) for p in path)
    name = ".".join(mods)
    if leaf == "kernel":
        leaf, transpose = "weight", True
    elif leaf == "embedding":
        leaf, transpose = "weight", False
    else:
        transpose = False
    prefix = "" if mods[0] == "lm_head" else "model."
    return f"{prefix}{name}.{leaf}", transpose


def config_from_hf(d: dict) -> DecoderConfig:
    """A config.json dict -> `Gemma2Config` for model_type gemma2, else `LlamaConfig` (which refuses other types)."""
    return (Gemma2Config if d.get("model_type") == "gemma2" else LlamaConfig).from_hf(d)


def load_config(directory: str | Path) -> DecoderConfig:
    """config.json -> config; a generation_config.json beside it (the released layout) sets
    `generation_eos_token_id` to its `eos_token_id` (`()` when it has none), the ids transformers' `generate`
    stops at (transformers `GenerationMixin` loads that file over config.json's ids)."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    cfg = config_from_hf(json.loads(path.read_text()))
    gen = Path(directory) / GENERATION_CONFIG
    if gen.exists():
        cfg = dataclasses.replace(cfg, generation_eos_token_id=stop_id_tuple(
            json.loads(gen.read_text()).get("eos_token_id")))
    return cfg


def decoder_class(cfg: DecoderConfig) -> type[Decoder]:
    return Gemma2 if isinstance(cfg, Gemma2Config) else Llama


def load_state_dict_into(model: Decoder, tensors: dict[str, np.ndarray], *, source: str = "checkpoint") -> Decoder:
    """Fill `model`'s parameters from a HF-named state dict; raises naming missing/unexpected/mismatched keys."""
    def key_of(path):
        key, transpose = hf_key(path)
        return key, (np.transpose if transpose else None)

    def ignore(key):
        return key.endswith(_IGNORED_SUFFIXES) or (key == "lm_head.weight" and model.config.tie_word_embeddings)

    return load_mapped(model, tensors, key_of, source=source, what="the model", ignore=ignore)


def from_pretrained(directory: str | Path, dtype=jnp.float32, *, config_overrides: dict | None = None) -> Decoder:
    """Load a Llama / Mistral / Qwen2 Hugging Face directory as an NNX `Llama`, a Gemma-2 one as a
    `jaxeff.models.gemma2.Gemma2`, with parameters and compute in `dtype`.

    `directory` may be `hf:<owner>/<repo>[@<revision>]`: its config, tokenizer and safetensors files are downloaded
    once with `jaxeff.io.hub.resolve` (errors as documented there). `config_overrides` replaces fields of the
    parsed config (`dataclasses.replace`), e.g. `{"attn_logit_softcapping": None}` for the numbers of
    transformers' SDPA path on Gemma-2. Raises FileNotFoundError, ValueError (unsupported config field, unknown
    override) or `CheckpointMismatchError` (naming missing / unexpected / mis-shaped keys)."""
    directory = hub.resolve(directory, allow_patterns=hub.HF_MODEL_FILES)
    if not directory.is_dir():
        hint = (f"; for a Hugging Face Hub repo pass 'hf:{directory}'"
                if len(directory.parts) == 2 and not directory.is_absolute() else "")
        raise FileNotFoundError(f"model directory {directory} does not exist{hint}")
    cfg = load_config(directory)
    if config_overrides:
        unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(cfg)})
        if unknown:
            raise ValueError(f"config_overrides names fields {type(cfg).__name__} does not have: {unknown}")
        cfg = dataclasses.replace(cfg, **config_overrides)
    return from_state_dict(cfg, load_checkpoint_dir(directory), dtype, source=str(directory))


def from_state_dict(cfg: DecoderConfig, tensors: dict[str, np.ndarray], dtype=jnp.float32, *,
                    source: str = "checkpoint") -> Decoder:
    """The decoder of `cfg` (`Llama` or `Gemma2`, parameters and compute in `dtype`) filled from a HF-named state
    dict (`model.layers.0.self_attn.q_proj.weight`, ...; e.g. a bigger checkpoint's keys with their prefix
    stripped). Raises `CheckpointMismatchError` naming missing / unexpected / mis-shaped keys."""
    model = nnx.eval_shape(lambda: decoder_class(cfg)(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    return load_state_dict_into(model, tensors, source=source)


def state_dict(model: Decoder, dtype=None) -> dict[str, np.ndarray]:
    """HF-named numpy state dict of `model` (optionally cast)."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    out = {}
    for path, value in flat.items():
        key, transpose = hf_key(path)
        arr = np.asarray(value if dtype is None else value.astype(dtype))
        out[key] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def save_pretrained(model: Decoder, directory: str | Path, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + safetensors (sharded with an index when larger than `max_shard_bytes`), and a
    generation_config.json with the stop ids when the config has `generation_eos_token_id`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict(model, dtype)
    torch_dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
        next(iter(tensors.values())).dtype, "bfloat16"
    )
    cfg = model.config.to_hf() | {"torch_dtype": torch_dtype}
    save_checkpoint_dir(tensors, directory, "model", max_shard_bytes=max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_eos = model.config.generation_eos_token_id
    if gen_eos is not None:
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": list(gen_eos) if isinstance(
            gen_eos, tuple) else gen_eos}
        (directory / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2))
