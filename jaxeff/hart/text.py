"""HART's text encoder: the last (final-norm) hidden state of a Qwen2 decoder over the prompt, with HART's LLM
system prompt prepended and then dropped, padded / truncated to `max_length` (300) tokens.

Padding follows the reference `encode_prompts`: right padding, pad tokens masked out as keys (Hugging Face
attention mask semantics) but kept as outputs; text positions are `cumsum(mask) - 1`. The decoder is
`jaxeff.models.llama.Llama` with a Qwen2 config; Qwen2-VL checkpoints are read through their language model
(text-only M-RoPE equals 1D RoPE). The tokenizer is `transformers.AutoTokenizer` from a local directory only.
Run on CPU only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.io import hub
from jaxeff.io.safetensors import load_checkpoint_dir
from jaxeff.models.llama import Llama, LlamaConfig
from jaxeff.nn import attention

# HART's `llm_system_prompt` (hart/utils/constants.py), used by sample.py by default.
SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation.\n\nExamples:\n- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round "
    "shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n- User "
    "Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a diverse "
    "crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.\n\nPlease "
    "generate only the enhanced description for the prompt below and DO NOT include any additional sentences. "
    'Start your response with "Enhanced Prompt:".\n\nUser Prompt:\n'
)


def qwen2_config(directory: str | Path) -> LlamaConfig:
    """The decoder config of a Qwen2 / Qwen2-VL Hugging Face directory (Qwen2-VL: its language model, whose
    text-only M-RoPE is 1D RoPE). Raises FileNotFoundError without a config.json (e.g. the HART checkpoint folder
    given as the text encoder) and ValueError naming any other model_type."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        hint = " (this is a HART checkpoint; the text encoder is Qwen2-VL-1.5B-Instruct)" \
            if (directory / "llm").is_dir() or (directory / "tokenizer" / "config.json").exists() else ""
        raise FileNotFoundError(f"{directory}: no config.json (expected a Qwen2 / Qwen2-VL model directory){hint}")
    d = json.loads(cfg_path.read_text())
    if d.get("model_type") not in ("qwen2", "qwen2_vl"):
        raise ValueError(f"{cfg_path}: model_type {d.get('model_type')!r}; HART's text encoder is a Qwen2 / Qwen2-VL "
                         "model directory (model_type 'qwen2' or 'qwen2_vl')")
    if d["model_type"] == "qwen2_vl":
        d = {**d.get("text_config", {}), **{k: v for k, v in d.items() if k != "text_config"}}
        d.update(model_type="qwen2", rope_scaling=None)
    return LlamaConfig.from_hf(d)


def load_qwen2(directory: str | Path, dtype=jnp.float32) -> Llama:
    """A Qwen2 (or the language model of a Qwen2-VL) Hugging Face directory as a `Llama`; the config is checked
    first (`qwen2_config`)."""
    from jaxeff.io.hf import load_state_dict_into

    directory = Path(directory)
    cfg = qwen2_config(directory)
    tensors = load_checkpoint_dir(directory)
    renamed = {}
    for k, v in tensors.items():
        if k.startswith(("visual.", "model.visual.")):
            continue
        renamed[k.replace("model.language_model.", "model.")] = v
    renamed.pop("lm_head.weight", None)  # AutoModel (no LM head) is what HART uses
    # tie_word_embeddings: the encoder needs no LM head (HART uses AutoModel's hidden states)
    cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    return load_state_dict_into(model, renamed, source=str(directory))


def encode_tokens(model: Llama, tokens, valid, n_sys: int):
    """Traceable text encoding: tokens / valid [B, n_sys + T] ([system prompt ; padded prompt], valid = not pad)
    -> (context [B, T, D] float32, positions [B, T] int32 = cumsum(mask) - 1 over the prompt part). Runs inside
    a caller's jit (the pipeline compiles it with generation and decoding as one program)."""
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    kv_pos = jnp.where(valid, pos, -1)  # padded keys are invisible (HF attention_mask); queries keep arange

    def attn(layer, q, k, v, *, q_positions, kv_positions):
        return attention(q, k, v, q_positions=q_positions, kv_positions=kv_pos, causal=True)

    ctx = model(tokens, pos, attention_fn=attn, output="hidden")[:, n_sys:].astype(jnp.float32)
    return ctx, jnp.cumsum(valid[:, n_sys:].astype(jnp.int32), axis=1) - 1


@functools.partial(jax.jit, static_argnames=("graphdef", "n_sys"))
def _encode(graphdef, state, tokens, valid, n_sys: int):
    return encode_tokens(nnx.merge(graphdef, state), tokens, valid, n_sys)


def check_prompts(prompts) -> None:
    """Raise ValueError unless `prompts` is a non-empty list (or tuple) of str: a bare str would iterate as one
    prompt per character."""
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of str, got one str {prompts[:40]!r}: pass [prompt]")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of str, got {type(prompts).__name__} {prompts!r:.60}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be str; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")


class TextEncoder:
    """prompts (a list of str) -> (context [B, T, D] float32, mask [B, T] bool, positions [B, T] int32)."""

    def __init__(self, model: Llama, tokenizer, max_length: int = 300, use_system_prompt: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.use_system_prompt = max_length, use_system_prompt
        if tokenizer.pad_token_id is None:
            raise ValueError("the text tokenizer has no pad token; HART pads prompts to max_length")

    @classmethod
    def from_pretrained(cls, directory: str | Path, max_length: int = 300, use_system_prompt: bool = True,
                        dtype=jnp.float32):
        from transformers import AutoTokenizer

        directory = hub.resolve(directory, allow_patterns=hub.HF_MODEL_FILES)
        qwen2_config(directory)  # a wrong folder is named here, not by the tokenizer's error
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        return cls(load_qwen2(directory, dtype), tok, max_length, use_system_prompt)

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """prompts (a list of str) -> token ids [B, max_length] int32, right-padded / truncated. Raises ValueError
        for a bare str (it would be one prompt per character), an empty list or a non-str element."""
        check_prompts(prompts)
        ids = [self.tokenizer(p, padding="max_length", max_length=self.max_length, truncation=True)["input_ids"]
               for p in prompts]
        return np.asarray(ids, np.int32)

    def token_inputs(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """Host-side tokenisation: (tokens, valid) [B, n_sys + max_length] int32 / bool for `encode_tokens`, and
        n_sys (the system prompt's length, 0 without it). Raises ValueError as `tokenize`."""
        tokens = self.tokenize(prompts)
        mask = tokens != self.tokenizer.pad_token_id
        sys = np.asarray(self.tokenizer(SYSTEM_PROMPT)["input_ids"], np.int32) if self.use_system_prompt else \
            np.zeros((0,), np.int32)
        full = np.concatenate([np.tile(sys[None], (len(prompts), 1)), tokens], 1)
        valid = np.concatenate([np.ones((len(prompts), len(sys)), bool), mask], 1)
        return full, valid, len(sys)

    def __call__(self, prompts: list[str]):
        full, valid, n_sys = self.token_inputs(prompts)
        graphdef, state = nnx.split(self.model)
        ctx, pos = _encode(graphdef, state, jnp.asarray(full), jnp.asarray(valid), n_sys=n_sys)
        return ctx, jnp.asarray(valid[:, n_sys:]), pos
