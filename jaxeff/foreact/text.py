"""ForeAct's text conditioning (`vf.py:89-95, 180-214`): Gemma-2-2B-it final hidden states of a chat prompt.

- Prompt: the tokenizer's chat template applied to one user turn `f"{system_prompt}\\n{caption}"` with
  `add_generation_prompt=True` (the system prompt sits inside the user turn; an empty caption keeps it), then the
  tokenizer called on that text with left padding, truncation at 256 tokens (as the official code does, so a
  template that already starts with `<bos>` gets the tokenizer's own `<bos>` too, whatever the tokenizer does).
- Features: the official model replaces `lm_head` by an Identity, so its "logits" are the final-norm hidden states
  passed through Gemma-2's final logit soft-cap: 30 tanh(h / 30) (checked against transformers in
  tests/test_foreact_text.py). The official model runs with `attn_implementation="sdpa"`, whose path skips the
  attention-logit soft-cap; `TextEncoder.from_pretrained` loads Gemma-2 without it by default (`sdpa_numerics`).

`TextEncoder` works with any decoder exposing final hidden states: a callable `hidden_fn(tokens [B, L] int32,
mask [B, L] int32) -> [B, L, H]`, or a jaxeff decoder module (`jaxeff.models.gemma2.Gemma2`, called as
`model(tokens, attention_mask=mask, output="hidden")`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.nn import soft_cap

SYSTEM_PROMPT = ("You are a robot and should focus on your actions. Generate a new image that meets the user's "
                 "instruction while maintaining consistency with the original input where appropriate.")
MAX_TEXT_TOKENS = 256
GEMMA = "hf:google/gemma-2-2b-it"


def chat_prompts(tokenizer, captions: Sequence[str], system_prompt: str = SYSTEM_PROMPT) -> list[str]:
    """The official prompt text per caption (the system prompt inside the single user turn)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"{system_prompt}\n{c}"}],
                                          add_generation_prompt=True, tokenize=False) for c in captions]


def tokenize(tokenizer, captions: Sequence[str], *, system_prompt: str = SYSTEM_PROMPT,
             max_tokens: int = MAX_TEXT_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [B, L] int32, mask [B, L] int32), left-padded to the longest prompt, truncated at `max_tokens`
    (a transformers tokenizer with a chat template; its padding side is restored afterwards)."""
    if isinstance(captions, str):
        captions = [captions]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(text=chat_prompts(tokenizer, captions, system_prompt), return_tensors="np", padding=True,
                        truncation=True, max_length=max_tokens)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def _module_hidden_fn(model: nnx.Module) -> Callable:
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, attention_mask=mask, output="hidden")

    return lambda tokens, mask: run(state, tokens, mask)


class TextEncoder:
    """`enc(captions)` -> (features [B, L, H], mask [B, L] int32), the official caption conditioning.

    decoder: an nnx decoder module (jaxeff `Gemma2`; its `config.final_logit_softcapping` is applied as the
    official Identity head does) or a `hidden_fn(tokens, mask)`; `final_softcap` overrides the cap (None = none).
    Raises ValueError when the decoder returns a batch or length different from the tokens'."""

    def __init__(self, tokenizer, decoder, *, system_prompt: str = SYSTEM_PROMPT, max_tokens: int = MAX_TEXT_TOKENS,
                 final_softcap: float | None | str = "auto"):
        if isinstance(decoder, nnx.Module):
            cap = getattr(decoder.config, "final_logit_softcapping", None)
            self.hidden_fn = _module_hidden_fn(decoder)
        else:
            cap, self.hidden_fn = None, decoder
        self.final_softcap = cap if final_softcap == "auto" else final_softcap
        self.tokenizer, self.system_prompt, self.max_tokens = tokenizer, system_prompt, max_tokens

    def __call__(self, captions: Sequence[str] | str) -> tuple[jax.Array, jax.Array]:
        ids, mask = tokenize(self.tokenizer, captions, system_prompt=self.system_prompt, max_tokens=self.max_tokens)
        hidden = self.hidden_fn(jnp.asarray(ids), jnp.asarray(mask))
        if hidden.shape[:2] != ids.shape:
            raise ValueError(f"decoder returned {hidden.shape} for tokens {ids.shape}")
        return soft_cap(hidden, self.final_softcap), jnp.asarray(mask)

    @classmethod
    def from_pretrained(cls, source: str = GEMMA, *, tokenizer_source: str | None = None, dtype=jnp.bfloat16,
                        sdpa_numerics: bool = True, tensors: dict[str, np.ndarray] | None = None) -> TextEncoder:
        """Gemma-2 through `jaxeff.io.from_pretrained` (an `hf:` name or a local directory; google/gemma-2-2b-it is
        gated: accept its licence and log in) and its tokenizer (transformers `AutoTokenizer`, from
        `tokenizer_source` or the same place). `tensors`: HF-named weights replacing the downloaded ones, e.g. a
        released ForeAct checkpoint's `mllm_backbone.*` part (`weights.split_released`). `sdpa_numerics` drops the
        attention-logit soft-cap, as the official SDPA path does."""
        from transformers import AutoTokenizer

        from jaxeff.io import hf, hub

        overrides = {"attn_logit_softcapping": None} if sdpa_numerics else None
        files = [p for p in hub.HF_MODEL_FILES if tensors is None or p != "*.safetensors"]
        path = hub.resolve(source, allow_patterns=files)
        if tensors is None:
            model = hf.from_pretrained(path, dtype, config_overrides=overrides)
        else:
            cfg = hf.load_config(path)
            model = hf.from_state_dict(dataclasses.replace(cfg, **(overrides or {})), tensors, dtype,
                                       source="mllm_backbone.*")
        tok_path = hub.resolve(tokenizer_source, allow_patterns=files) if tokenizer_source else path
        return cls(AutoTokenizer.from_pretrained(str(tok_path)), model)
