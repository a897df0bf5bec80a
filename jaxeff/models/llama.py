"""One decoder for Llama 2 / 3 / 3.1, Mistral and Qwen2 checkpoints (Gemma-2: `jaxeff.models.gemma2`, which reuses
this file's attention projections, input checks and `generate`).

Parameter names follow the Hugging Face modules (`embed_tokens`, `layers[i].self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm`, ...) so the weight mapping in `jaxeff.io.hf` is mechanical: a torch Linear `weight` [out, in]
is our `kernel` [in, out].

Attention is pluggable at two points, which is how the system packages reuse this decoder unchanged:
- `cache=`: any pytree with `attend(layer, q, k, v, q_positions, ...) -> (out, cache)` (contiguous, dual, paged);
- `attention_fn=`: `f(layer, q, k, v, *, q_positions, kv_positions) -> out` for cache-free forwards
  (sequence parallelism, DuoAttention gate training); it gets no sliding window, so models with windowed layers
  refuse it.

`LlamaConfig.from_hf` honours every field of the three transformers configs that changes the forward pass (per-layer
sliding windows, biases, head_dim, rope types default / linear / llama3 / yarn, tied embeddings, eps) and refuses by
name what it cannot compute (dynamic / longrope rope, partial rotary, other activations); `to_hf` writes them back.
Training-only fields (attention_dropout) are not used. `generate` takes token ids or input embeddings (a VLM's
prompt) and stops at any of several stop ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.models import sharding
from jaxeff.nn import ContiguousKVCache, RMSNorm, RopeScaling, SwiGLU, apply_rope, attention, inv_frequencies

MODEL_TYPES = ("llama", "mistral", "qwen2")
LAYER_TYPES = ("full_attention", "sliding_attention")
_ACTIVATIONS = ("silu", "swish")  # transformers' ACT2FN names of the one activation SwiGLU computes
# transformers' defaults (LlamaConfig / MistralConfig / Qwen2Config) for keys a config.json may leave out
_HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 131072, "sliding_window": 4096,
                "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "sliding_window": 4096,
              "max_window_layers": 28},
}


def stop_id_tuple(ids: int | Sequence[int] | None) -> tuple[int, ...]:
    """None, one id or several ids (a config's `eos_token_id`, a `generate(eos_id=...)`) -> a tuple of ints."""
    if ids is None:
        return ()
    arr = np.asarray(ids)
    if arr.size and (arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"stop ids must be an int or a flat sequence of ints, got {ids!r}")
    return tuple(int(i) for i in arr.reshape(-1))


def normalize_eos_fields(cfg) -> None:
    """In a frozen config's `__post_init__`: list-valued `eos_token_id` / `generation_eos_token_id` -> tuples."""
    for name in ("eos_token_id", "generation_eos_token_id"):
        if isinstance(getattr(cfg, name), (list, tuple)):
            object.__setattr__(cfg, name, stop_id_tuple(getattr(cfg, name)))


def generation_stop_ids(cfg) -> tuple[int, ...]:
    """The ids `generate` stops at by default: `generation_eos_token_id` (the checkpoint's generation_config.json)
    when set, else `eos_token_id` (transformers' order)."""
    ids = cfg.generation_eos_token_id
    return stop_id_tuple(cfg.eos_token_id if ids is None else ids)


# `generate(eos_id=CONFIG_EOS)` (the default): stop at `generation_stop_ids(model.config)`; `eos_id=None`: never stop.
CONFIG_EOS = "config"


def resolve_stop_ids(cfg, eos_id: int | Sequence[int] | None | str) -> tuple[int, ...]:
    """The stop ids of a generate loop's `eos_id` argument, one rule for every loop (`generate` here,
    `jaxeff.duo_attention.generate`, `jaxeff.lserve.Engine.generate`): `CONFIG_EOS` -> `generation_stop_ids(cfg)`
    (the checkpoint's ids, as transformers' `generate`); None -> () (never stop); one id or several -> those.
    cfg: the model's config (`LlamaConfig`, `Gemma2Config`). TypeError for another string or a non-integer id."""
    if isinstance(eos_id, str):
        if eos_id != CONFIG_EOS:
            raise TypeError(f"eos_id must be {CONFIG_EOS!r}, None, an int or a sequence of ints, got {eos_id!r}")
        return generation_stop_ids(cfg)
    return stop_id_tuple(eos_id)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The computation-changing fields of a transformers Llama / Mistral / Qwen2 config.

    Per model type, as transformers computes it: q/k/v biases (`attention_bias`) are always on for Qwen2, never for
    Mistral, and on Llama they also bias o_proj; `mlp_bias` exists on Llama only. `layer_types` says per layer
    whether `sliding_window` applies ("sliding_attention") or not ("full_attention"); None = every layer when
    `sliding_window` is set (Mistral), Qwen2's `use_sliding_window` / `max_window_layers` are turned into it.
    `eos_token_id` is one id or a tuple of ids (Llama-3 Instruct lists several). `generation_eos_token_id` is
    generation_config.json's `eos_token_id` (what transformers' `generate` stops at; `()` when that file gives none),
    set by `jaxeff.io.from_pretrained`; None (no such file, or a config built in code) means `eos_token_id`, as
    transformers' `GenerationConfig.from_model_config`. `generate` stops at `generation_stop_ids(config)` by default.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    model_type: str = "llama"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    generation_eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} not supported; supported: {MODEL_TYPES}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported (the MLP is SwiGLU: {_ACTIVATIONS})")
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("qwen2 always has q/k/v biases (transformers' Qwen2 ignores attention_bias): "
                             "set attention_bias=True")
        if self.model_type == "mistral" and self.attention_bias:
            raise ValueError("mistral has no attention biases (transformers' Mistral ignores attention_bias)")
        if self.mlp_bias and self.model_type != "llama":
            raise ValueError(f"mlp_bias exists only on llama (transformers' {self.model_type} MLP has no bias)")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad or len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types must give one of {LAYER_TYPES} for each of the "
                                 f"{self.num_hidden_layers} layers, got {self.layer_types}")
            if self.sliding_window is None and "sliding_attention" in self.layer_types:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.sliding_window is not None and self.model_type == "llama":
            raise ValueError("llama has no sliding window (transformers' Llama ignores it); use model_type "
                             "'mistral' or 'qwen2'")
        normalize_eos_fields(self)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """The sliding window of each layer (None = full causal attention)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_hidden_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias and self.model_type == "llama"

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        """From a Hugging Face config.json dict (llama, mistral, qwen2), with transformers' defaults for missing
        keys that change the computation; fields jaxeff cannot compute raise ValueError naming them."""
        model_type = d.get("model_type", "llama")
        if model_type == "gemma2":
            raise ValueError("config.json model_type 'gemma2' is not this decoder: use "
                             "jaxeff.models.gemma2.Gemma2Config (jaxeff.io.from_pretrained picks it from config.json)")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json model_type {model_type!r} not supported; supported: {MODEL_TYPES}")
        d = _HF_DEFAULTS[model_type] | d
        max_pos = d["max_position_embeddings"]
        rope_theta, rope_scaling = rope_from_hf(d, max_pos)
        window, layer_types = None, None
        if model_type == "mistral":
            window = d["sliding_window"]  # every layer: MistralModel ignores layer_types
        elif model_type == "qwen2" and d.get("use_sliding_window", False):
            window = d["sliding_window"]
            n = d["num_hidden_layers"]
            layer_types = d.get("layer_types") or [
                "sliding_attention" if window is not None and i >= d["max_window_layers"]
                else "full_attention" for i in range(n)
            ]
        if window is None:
            layer_types = None  # transformers: no window on any layer, whatever layer_types says
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias={"qwen2": True, "mistral": False}.get(model_type, d.get("attention_bias", False)),
            mlp_bias=d.get("mlp_bias", False) if model_type == "llama" else False,
            hidden_act=d.get("hidden_act", "silu"),
            sliding_window=window,
            layer_types=layer_types,
            model_type=model_type,
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )

    def to_hf(self) -> dict:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            windows = self.layer_windows
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in windows]
            # Readers without layer_types (transformers < 4.53) window the layers from max_window_layers on.
            d["max_window_layers"] = next((i for i, w in enumerate(windows) if w is not None), len(windows))
        return d


def rope_from_hf(d: dict, max_position_embeddings: int) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) of a Hugging Face config dict: `rope_scaling` (transformers < 5) or `rope_parameters`
    (>= 5, which also carries rope_theta); a top-level original_max_position_embeddings wins, as in transformers.
    A partial rotary factor raises ValueError."""
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    partial = d.get("partial_rotary_factor")
    if partial is not None and partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (rotary on the whole head only)")
    if "original_max_position_embeddings" in d:
        rope = {**rope, "original_max_position_embeddings": d["original_max_position_embeddings"]}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    return theta, RopeScaling.from_hf(rope, max_position_embeddings)


OUTPUTS = ("logits", "hidden")


def check_inputs(tokens, inputs_embeds, positions, output: str):
    """The shared argument checks of a decoder forward; returns positions [B, S] (default arange)."""
    if (tokens is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of tokens or inputs_embeds")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    b, s = (tokens if inputs_embeds is None else inputs_embeds).shape[:2]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return positions


class LlamaAttention(nnx.Module):
    """q/k/v/o projections of transformers' Llama / Mistral / Qwen2 / Gemma2 attention; `cfg` is any config with
    hidden_size, num_attention_heads, num_key_value_heads, head_dim, attention_bias, o_proj_bias and
    initializer_range (`LlamaConfig`, `Gemma2Config`)."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        init = nnx.initializers.normal(cfg.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
        hd = cfg.head_dim
        self.q_proj = nnx.Linear(cfg.hidden_size, self.num_heads * hd, use_bias=cfg.attention_bias, **kw)
        self.k_proj = nnx.Linear(cfg.hidden_size, self.num_kv_heads * hd, use_bias=cfg.attention_bias, **kw)
        self.v_proj = nnx.Linear(cfg.hidden_size, self.num_kv_heads * hd, use_bias=cfg.attention_bias, **kw)
        self.o_proj = nnx.Linear(self.num_heads * hd, cfg.hidden_size, use_bias=cfg.o_proj_bias, **kw)

    def qkv(self, x, positions, inv_freq, rope_scale: float = 1.0):
        """Projected, RoPE-rotated q [B,S,Hq,D] and k, v [B,S,Hkv,D] (cos/sin times `rope_scale`, yarn)."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        return apply_rope(q, positions, inv_freq, rope_scale), apply_rope(k, positions, inv_freq, rope_scale), v

    def output(self, attn_out):
        b, s = attn_out.shape[:2]
        return self.o_proj(attn_out.reshape(b, s, self.num_heads * self.head_dim))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias, dtype=dtype,
                          param_dtype=param_dtype, init_std=cfg.initializer_range, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)


AttentionFn = Callable[..., jnp.ndarray]


class Llama(nnx.Module):
    """Decoder-only LM. `model(tokens)` -> logits [B, S, vocab]."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)
        layer_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, **layer_kw) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=param_dtype,
                                      kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)

    def logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        tokens: jnp.ndarray | None,
        positions: jnp.ndarray | None = None,
        *,
        cache: Any = None,
        attention_fn: AttentionFn | None = None,
        inputs_embeds: jnp.ndarray | None = None,
        output: str = "logits",
        implementation: str | None = None,
    ):
        """Forward pass.

        tokens [B, S] int (or `inputs_embeds` [B, S, hidden]); positions [B, S] (default arange);
        output "logits" or "hidden" (final-norm hidden states). With `cache`, returns (output, new_cache).
        """
        positions = check_inputs(tokens, inputs_embeds, positions, output)
        x = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        cfg = self.config
        windows = cfg.layer_windows
        if attention_fn is not None and cache is None and any(w is not None for w in windows):
            raise ValueError(f"attention_fn gets no sliding window, but this model's layers use "
                             f"sliding_window={cfg.sliding_window} (layer_types={cfg.layer_types})")
        inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        rope_scale = cfg.rope_scaling.attention_scaling if cfg.rope_scaling else 1.0
        for i, layer in enumerate(self.layers):
            window = windows[i]
            h = layer.input_layernorm(x)
            q, k, v = layer.self_attn.qkv(h, positions, inv_freq, rope_scale)
            if cache is not None:
                a, cache = cache.attend(i, q, k, v, positions, sliding_window=window, implementation=implementation)
            elif attention_fn is not None:
                a = attention_fn(i, q, k, v, q_positions=positions, kv_positions=positions)
            else:
                a = attention(q, k, v, q_positions=positions, kv_positions=positions, causal=True,
                              sliding_window=window, implementation=implementation)
            x = x + layer.self_attn.output(a)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.norm(x)
        out = x if output == "hidden" else self.logits(x)
        return (out, cache) if cache is not None else out

    def init_cache(self, batch: int, max_len: int, dtype=None) -> ContiguousKVCache:
        cfg = self.config
        return ContiguousKVCache.init(cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim,
                                      dtype or self.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Generation


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) restricted by top_k (0 = off) and top_p."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling config {self}")


def sample_token(logits: jnp.ndarray, rng: jax.Array, sampling: SamplingConfig) -> jnp.ndarray:
    """logits [B, V] -> tokens [B]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # smallest set whose mass reaches top_p: keep tokens whose preceding mass is < top_p
        keep = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def is_stop(tokens: jnp.ndarray, stop_ids: jnp.ndarray) -> jnp.ndarray:
    """tokens [...] int, stop_ids [K] int (K may be 0) -> bool [...]: the token is one of the stop ids. Traceable,
    so a decode loop takes the stop ids as an array argument and one compiled program serves every stop set of
    that size."""
    return jnp.any(tokens[..., None] == stop_ids, axis=-1)


def num_generated(tokens: np.ndarray, stop_ids: Sequence[int]) -> np.ndarray:
    """tokens [B, N] -> [B] int: tokens up to and including the first stop id (N where none)."""
    hit = np.isin(tokens, np.asarray(stop_ids, np.int64))
    return np.where(hit.any(1), hit.argmax(1) + 1, tokens.shape[1])


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # [B, max_new_tokens]; after a stop id: pad_id
    num_generated: np.ndarray  # [B], the stop id included


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "pad_id", "implementation"))
def _generate_jit(graphdef, state, tokens, inputs_embeds, prompt_lens, cache, rng, stop_ids, *, max_new_tokens,
                  sampling, pad_id, implementation):
    """Prefill `tokens` [B, S] or `inputs_embeds` [B, S, D] (the other None; rows right-padded, real lengths
    `prompt_lens`), then a `lax.scan` decode loop."""
    model = nnx.merge(graphdef, state)
    b, s = (tokens if inputs_embeds is None else inputs_embeds).shape[:2]
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    logits, cache = model(tokens, positions, cache=cache, inputs_embeds=inputs_embeds, implementation=implementation)
    last = jnp.take_along_axis(logits, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    rng, sub = jax.random.split(rng)
    first = sample_token(last, sub, sampling)
    done = is_stop(first, stop_ids)

    def step(carry, _):
        cache, token, pos, done, rng = carry
        logits, cache = model(token[:, None], pos[:, None], cache=cache, implementation=implementation)
        rng, sub = jax.random.split(rng)
        nxt = sample_token(logits[:, 0], sub, sampling)
        nxt = jnp.where(done, pad_id, nxt)
        return (cache, nxt, pos + 1, done | is_stop(nxt, stop_ids), rng), nxt

    (_, _, _, _, _), rest = jax.lax.scan(step, (cache, first, prompt_lens, done, rng), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1,
                vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a list of token lists (or an integer array [B, S0]: equal-length prompts) to [B, S] (S rounded up
    to `multiple`); returns (tokens, lengths). ValueError for an empty prompt, a prompt that is not a list of
    integer ids, or (with `vocab_size`) an id outside [0, vocab_size): an embedding lookup would silently clamp it."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if prompts.ndim != 2:
            raise ValueError(f"a prompt array must be [batch, length] token ids, got shape {prompts.shape}")
        prompts = list(np.asarray(prompts))
    if (isinstance(prompts, str) or not len(prompts)
            or any(isinstance(p, str) or np.ndim(p) != 1 for p in prompts)):
        raise ValueError("prompts must be a list of token-id lists, e.g. [[1, 2, 3]] for one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    for i, p in enumerate(prompts):
        if not np.issubdtype(np.asarray(p).dtype, np.integer):
            raise ValueError(f"prompt {i} holds {np.asarray(p).dtype} values; token ids must be integers")
    if vocab_size is not None:
        for i, p in enumerate(prompts):
            ids = np.asarray(p)
            outside = ids[(ids < 0) | (ids >= vocab_size)]
            if outside.size:
                raise ValueError(f"token id {int(outside[0])} in prompt {i} is outside the vocabulary "
                                 f"[0, {vocab_size})")
    lengths = np.array([len(p) for p in prompts], np.int32)
    s = int(-(-lengths.max() // multiple) * multiple)
    tokens = np.full((len(prompts), s), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


def _pad_embeds(inputs_embeds, prompt_lens, hidden: int, multiple: int) -> tuple[jnp.ndarray, np.ndarray]:
    """inputs_embeds [B, S, hidden] (+ real lengths [B], default S) -> (zero right-padded to a multiple, lengths)."""
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden or not inputs_embeds.shape[1]:
        raise ValueError(f"inputs_embeds must be [B, S >= 1, {hidden}], got {inputs_embeds.shape}")
    b, s = inputs_embeds.shape[:2]
    lengths = np.full(b, s, np.int32) if prompt_lens is None else np.asarray(prompt_lens, np.int32).reshape(-1)
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > s:
        raise ValueError(f"prompt_lens must give a length in [1, {s}] for each of the {b} rows, got {prompt_lens}")
    padded = -(-s // multiple) * multiple
    return jnp.pad(jnp.asarray(inputs_embeds), ((0, 0), (0, padded - s), (0, 0))), lengths


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]] | None,
    max_new_tokens: int,
    *,
    inputs_embeds: jnp.ndarray | None = None,
    prompt_lens: Sequence[int] | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    eos_id: int | Sequence[int] | None | str = CONFIG_EOS,
    pad_id: int = 0,
    seed: int = 0,
    implementation: str | None = None,
) -> GenerateOutput:
    """Generate for a batch of prompts of different lengths: one prefill, then a compiled `lax.scan` decode loop
    over a contiguous KV cache (prefill and decode are a single jitted program). `model` is a `Llama` or a
    `jaxeff.models.gemma2.Gemma2` (per-layer sliding windows and soft-caps honoured in the cache).

    The prompt is either `prompts` (lists of token ids) or, with `prompts=None`, `inputs_embeds` [B, S, hidden]
    (e.g. a VLM's text and visual embeddings; rows right-padded, real lengths `prompt_lens`, default S).
    eos_id: `CONFIG_EOS` ("config", the default) stops at the checkpoint's ids, `generation_stop_ids(model.config)`
    (generation_config.json's `eos_token_id`, else config.json's, as transformers' `generate`); None never stops;
    one id or several (a list, e.g. Llama-3 Instruct's) replace them (`resolve_stop_ids`, shared with
    `jaxeff.duo_attention.generate` and `jaxeff.lserve.Engine.generate`). A row stops after the first stop id it
    generates and is `pad_id` after it. TypeError for an `eos_id` string other than `CONFIG_EOS`."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if (prompts is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of prompts (token ids) or inputs_embeds")
    if prompt_lens is not None and inputs_embeds is None:
        raise ValueError("prompt_lens goes with inputs_embeds (token prompts carry their own lengths)")
    stops = resolve_stop_ids(model.config, eos_id)
    if prompts is not None:
        tokens, lengths = pad_prompts(prompts, pad_id, multiple=16, vocab_size=model.config.vocab_size)
        tokens, shape = jnp.asarray(tokens), tokens.shape
    else:
        inputs_embeds, lengths = _pad_embeds(inputs_embeds, prompt_lens, model.config.hidden_size, multiple=16)
        tokens, shape = None, inputs_embeds.shape[:2]
    # a model placed by `jaxeff.models.sharding.shard_model` gets its cache built straight into its shards
    cache = sharding.init_cache(lambda: model.init_cache(shape[0], shape[1] + max_new_tokens), model)
    graphdef, state = nnx.split(model)
    out = _generate_jit(graphdef, state, tokens, inputs_embeds, jnp.asarray(lengths), cache, jax.random.key(seed),
                        jnp.asarray(stops, jnp.int32), max_new_tokens=max_new_tokens, sampling=sampling,
                        pad_id=pad_id, implementation=implementation)
    out = np.asarray(out)
    return GenerateOutput(tokens=out, num_generated=num_generated(out, stops))
