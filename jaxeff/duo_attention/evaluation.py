"""Passkey prompts for generation-based evaluation, with the character tokenizer or a model's own tokenizer.

The examples are `jaxeff.data.PasskeyTask`'s (English haystack, needle at a depth, question at the end); a prompt
stops right before the key and a prediction is correct when the generated text starts with the key digits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxeff.data import PasskeyTask, english_corpus
from jaxeff.data.passkey import QUESTION


def load_tokenizer(model_dir: str | Path):
    """The Hugging Face tokenizer stored with a model (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def passkey_prompts(context: int, n: int, *, seed: int = 12345, depth: float | None = None, tokenizer=None,
                    key_digits: int = 5) -> tuple[list[list[int]], list[str]]:
    """(prompt token lists, keys). context counts characters of the char task (`PasskeyTask` examples); with a
    Hugging Face `tokenizer` it counts about that many of its tokens: the same needle and question around a
    haystack of the same English text (repeated for contexts longer than the corpus), sized by the tokenizer's
    characters per token."""
    if tokenizer is None:
        task = PasskeyTask(context=context, key_digits=key_digits)
        batch = task.batch(seed, np.arange(n), depth=depth)
        prompts = [row[: context - key_digits].tolist() for row in batch["tokens"]]
        keys = [task.tokenizer.decode(row[context - key_digits:]) for row in batch["tokens"]]
        return prompts, keys
    task = PasskeyTask(key_digits=key_digits)
    corpus = english_corpus()
    sample = corpus[:20000]
    chars_per_token = len(sample) / len(tokenizer.encode(sample, add_special_tokens=False))
    hay_len = int(context * chars_per_token * 0.97) - len(task.needle("0" * key_digits)) - len(QUESTION)
    reps = -(-(hay_len + len(corpus)) // len(corpus))  # long contexts repeat the corpus
    text = corpus * reps
    prompts, keys = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        key = str(rng.integers(1, 10)) + "".join(str(d) for d in rng.integers(0, 10, key_digits - 1))
        start = int(rng.integers(0, len(corpus)))
        hay = text[start: start + hay_len]
        cut = int(round((rng.uniform(task.min_depth, task.max_depth) if depth is None else depth) * hay_len))
        prompt = hay[:cut] + task.needle(key) + hay[cut:] + QUESTION.rstrip()
        prompts.append(list(tokenizer.encode(prompt, add_special_tokens=True)))
        keys.append(key)
    return prompts, keys


def key_matches(generated: np.ndarray, keys: Sequence[str], tokenizer=None) -> np.ndarray:
    """Bool [B]: the generated text (leading spaces stripped) starts with the key."""
    if tokenizer is None:
        tokenizer = PasskeyTask().tokenizer
    texts = [tokenizer.decode([int(t) for t in row]).lstrip() for row in generated]
    return np.array([t.startswith(k) for t, k in zip(texts, keys)])
