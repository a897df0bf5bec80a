"""Passkey prompts for generation-based evaluation, with the character tokenizer or a model's own tokenizer.

The examples are `jaxeff.data.PasskeyTask`'s (English haystack, needle at a depth, question at the end); a prompt
stops right before the key and a prediction is correct when the generated text starts with the key digits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxeff.data import PasskeyTask


def load_tokenizer(model_dir: str | Path):
    """The Hugging Face tokenizer stored with a model (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def passkey_prompts(context: int, n: int, *, seed: int = 12345, depth: float | None = None, tokenizer=None,
                    key_digits: int = 5) -> tuple[list[list[int]], list[str]]:
    """(prompt token lists, keys). context counts characters of the char task; with a Hugging Face `tokenizer`
    it counts that tokenizer's tokens (the haystack is sized by the tokenizer's characters per token)."""
    if tokenizer is None:
        task = PasskeyTask(context=context, key_digits=key_digits)
        batch = task.batch(seed, np.arange(n), depth=depth)
        prompts = [row[: context - key_digits].tolist() for row in batch["tokens"]]
        keys = [task.tokenizer.decode(row[context - key_digits:]) for row in batch["tokens"]]
        return prompts, keys
    sample = PasskeyTask(context=4096).example(seed, 0)["tokens"][1:]
    text = PasskeyTask().tokenizer.decode(sample)
    chars_per_token = len(text) / len(tokenizer.encode(text, add_special_tokens=False))
    task = PasskeyTask(context=int(context * chars_per_token * 0.97), key_digits=key_digits)
    prompts, keys = [], []
    for i in range(n):
        row = task.example(seed, i, depth)["tokens"]
        prompt_text = task.tokenizer.decode(row[1: len(row) - key_digits]).rstrip()
        prompts.append(list(tokenizer.encode(prompt_text, add_special_tokens=True)))
        keys.append(task.tokenizer.decode(row[len(row) - key_digits:]))
    return prompts, keys


def key_matches(generated: np.ndarray, keys: Sequence[str], tokenizer=None) -> np.ndarray:
    """Bool [B]: the generated text (leading spaces stripped) starts with the key."""
    if tokenizer is None:
        tokenizer = PasskeyTask().tokenizer
    texts = [tokenizer.decode([int(t) for t in row]).lstrip() for row in generated]
    return np.array([t.startswith(k) for t, k in zip(texts, keys)])
