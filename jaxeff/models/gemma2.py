"""Gemma-2 decoder (transformers `Gemma2ForCausalLM` / `Gemma2Model`), e.g. ForeAct's `google/gemma-2-2b-it` text
encoder.

What differs from `jaxeff.models.llama` (transformers `models/gemma2/modeling_gemma2.py`, 4.57.3 and 5.x):
- token embeddings times sqrt(hidden_size), the factor rounded to the model dtype (bf16: sqrt(2304) = 48 exactly);
- `GemmaRMSNorm` (x / rms(x) * (1 + weight), float32), four per layer: input, post-attention, pre- and
  post-feed-forward: `x += post_attn_norm(attn(input_norm(x)))`, `x += post_ff_norm(mlp(pre_ff_norm(x)))`;
- GeGLU MLP (`gelu_pytorch_tanh`);
- attention logits scaled by `query_pre_attn_scalar ** -0.5` (not head_dim), then soft-capped
  `c * tanh(logits / c)` with c = `attn_logit_softcapping` (transformers' eager path). Its SDPA path skips this
  cap: in 4.57.3 Gemma-2 allows SDPA (`modeling_gemma2.py:346`) and `sdpa_attention_forward`
  (`integrations/sdpa_attention.py:48-58`) drops the `softcap` argument into unused kwargs; ForeAct loads Gemma
  with `attn_implementation="sdpa"` (foreact `models/visualforesight.py`), so its features are computed without
  the cap: load with `config_overrides={"attn_logit_softcapping": None}` for those numbers (5.x refuses SDPA);
- `layer_types` (default: layers 0, 2, 4, ... "sliding_attention" with window `sliding_window`, the others full);
- final logits soft-capped with c = `final_logit_softcapping`; embeddings tied by default.

Usage (shapes: B batch, S tokens, H hidden_size; dtype = the model's):

    model = jaxeff.io.from_pretrained("hf:google/gemma-2-2b-it", dtype=jnp.bfloat16)  # -> Gemma2
    h = model(tokens, attention_mask=mask, output="hidden")   # [B, S, H] final-norm hidden states
    logits = model(tokens, attention_mask=mask)               # [B, S, vocab], final soft-cap applied

`tokens` [B, S] int; `attention_mask` [B, S] (1 = token, 0 = padding; left padding as the tokenizer writes it):
positions stay `arange(S)` whatever the mask (as transformers' forward does), padded keys are hidden from every
query, and rows at padded queries come back as finite values of no meaning (transformers' are also meaningless).
`Gemma2ForCausalLM` caps after `lm_head` (4.57.3 `modeling_gemma2.py:565-569`), so with ForeAct's
`lm_head = nn.Identity()` its "logits" are `soft_cap(h, config.final_logit_softcapping)` (`jaxeff.nn.soft_cap`),
checked against transformers in tests/test_gemma2_parity.py. `jaxeff.models.llama.generate(model, ...)`
decodes greedily or by sampling with a KV cache, honouring each layer's window and both caps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxeff.models.llama import LAYER_TYPES, Llama, LlamaAttention, check_inputs, normalize_eos_fields, rope_from_hf
from jaxeff.nn import GeGLU, GemmaRMSNorm, RopeScaling, attention, inv_frequencies, soft_cap

ACTIVATIONS = ("gelu_pytorch_tanh",)
# transformers' Gemma2Config defaults (gemma-2-2b's shape) for keys a config.json may leave out
_HF_DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0, "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1,
    "bos_token_id": 2,
}


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """The computation-changing fields of a transformers `Gemma2Config`.

    `layer_types` None means transformers' default: "sliding_attention" on even layers (0, 2, ...),
    "full_attention" on odd ones. Soft-caps None = off. Raises ValueError on inconsistent fields.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    generation_eos_token_id: int | tuple[int, ...] | None = None  # as in `LlamaConfig`

    model_type = "gemma2"  # a class constant, not a field

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} not supported (the MLP is GeGLU: "
                             f"{ACTIVATIONS})")
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", tuple(
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_hidden_layers)))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types must give one of {LAYER_TYPES} for each of the {self.num_hidden_layers} "
                             f"layers, got {self.layer_types}")
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError(f"layer_types has sliding_attention layers but sliding_window={self.sliding_window}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0{' or None' if 'soft' in name else ''}, got {value}")
        normalize_eos_fields(self)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """The sliding window of each layer (None = full causal attention)."""
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    @property
    def o_proj_bias(self) -> bool:  # transformers' Gemma2Attention biases o_proj with attention_bias too
        return self.attention_bias

    @classmethod
    def from_hf(cls, d: dict) -> Gemma2Config:
        """From a Hugging Face gemma2 config.json dict, with transformers' defaults for missing keys; fields jaxeff
        cannot compute (another activation, bidirectional attention, dynamic / longrope rope, partial rotary)
        raise ValueError naming them."""
        if d.get("model_type", "gemma2") != "gemma2":
            raise ValueError(f"Gemma2Config.from_hf needs model_type 'gemma2', got {d.get('model_type')!r}")
        if d.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True is not supported (Gemma-2 here is causal)")
        d = _HF_DEFAULTS | d
        rope_theta, rope_scaling = rope_from_hf(d, d["max_position_embeddings"])
        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "query_pre_attn_scalar", "sliding_window", "attn_logit_softcapping",
                  "final_logit_softcapping", "pad_token_id", "bos_token_id", "eos_token_id")
        return cls(
            **{k: d[k] for k in fields},
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=d.get("attention_bias", False),
            hidden_activation=d.get("hidden_activation") or "gelu_pytorch_tanh",
            layer_types=d.get("layer_types"),
            initializer_range=d.get("initializer_range", 0.02),
        )

    def to_hf(self) -> dict:
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        skip = ("rope_scaling", "layer_types", "eos_token_id", "generation_eos_token_id")  # the last: its own file
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"} | d | {
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "layer_types": list(self.layer_types),
            "eos_token_id": eos,
        }


class Gemma2DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = GeGLU(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                         init_std=cfg.initializer_range, rngs=rngs)
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)


class Gemma2(nnx.Module):
    """Gemma-2 decoder-only LM; parameter names follow transformers (`embed_tokens`, `layers[i].self_attn.q_proj`,
    `mlp.gate_proj`, `pre_feedforward_layernorm`, `norm`, `lm_head` when untied), so `jaxeff.io` loads and saves
    it like the Llama family."""

    def __init__(self, cfg: Gemma2Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        init = nnx.initializers.normal(cfg.initializer_range)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=init, rngs=rngs)
        layer_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([Gemma2DecoderLayer(cfg, **layer_kw) for _ in range(cfg.num_hidden_layers)])
        self.norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=param_dtype, kernel_init=init, rngs=rngs)

    def embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """tokens [B, S] int -> [B, S, H] in the model dtype, times sqrt(H) rounded to that dtype."""
        return self.embed_tokens(tokens) * jnp.asarray(self.config.hidden_size**0.5, self.dtype)

    def logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """Final-norm hidden [..., H] -> soft-capped logits [..., vocab]."""
        out = self.embed_tokens.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        return soft_cap(out, self.config.final_logit_softcapping)

    def __call__(
        self,
        tokens: jnp.ndarray | None,
        positions: jnp.ndarray | None = None,
        *,
        attention_mask: jnp.ndarray | None = None,
        cache: Any = None,
        inputs_embeds: jnp.ndarray | None = None,
        output: str = "logits",
        implementation: str | None = None,
    ):
        """Forward pass.

        tokens [B, S] int, or `inputs_embeds` [B, S, H] used as given (transformers >= 5: the sqrt(H) factor
        belongs to the embedding layer, see `embed`; 4.x multiplied inputs_embeds by it too);
        positions [B, S] int (default arange(S)); attention_mask [B, S] (1 = token, 0 = padding; cache-free
        forwards only); output "logits" ([B, S, vocab], soft-capped) or "hidden" ([B, S, H], after the final norm).
        With `cache` (e.g. `init_cache`), returns (output, new_cache). Raises ValueError on a bad combination or
        a mask of the wrong shape.
        """
        positions = check_inputs(tokens, inputs_embeds, positions, output)
        kv_positions = positions
        if attention_mask is not None:
            if cache is not None:
                raise ValueError("attention_mask is for cache-free forwards (generate right-pads and tracks lengths)")
            mask = jnp.asarray(attention_mask)
            if mask.shape != positions.shape:
                raise ValueError(f"attention_mask must be [B, S] = {positions.shape}, got {mask.shape}")
            kv_positions = jnp.where(mask.astype(bool), positions, -1)  # negative = a slot no query sees
        x = self.embed(tokens) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        cfg = self.config
        inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        rope_scale = cfg.rope_scaling.attention_scaling if cfg.rope_scaling else 1.0
        attn_kw = dict(scale=cfg.query_pre_attn_scalar**-0.5, logit_softcap=cfg.attn_logit_softcapping,
                       implementation=implementation)
        for i, (layer, window) in enumerate(zip(self.layers, cfg.layer_windows)):
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), positions, inv_freq, rope_scale)
            if cache is not None:
                a, cache = cache.attend(i, q, k, v, positions, sliding_window=window, **attn_kw)
            else:
                a = attention(q, k, v, q_positions=positions, kv_positions=kv_positions, causal=True,
                              sliding_window=window, **attn_kw)
            x = x + layer.post_attention_layernorm(layer.self_attn.output(a))
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        x = self.norm(x)
        out = x if output == "hidden" else self.logits(x)
        return (out, cache) if cache is not None else out

    init_cache = Llama.init_cache  # the same cache fields (layers, KV heads, head_dim, dtype)
