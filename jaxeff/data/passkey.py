"""Passkey retrieval in a haystack of real English text (Mohtashami & Jaggi's format, character level).

An example is `<bos> [haystack] The pass key is 48213. Remember it. 48213 is the pass key. [haystack]
What is the pass key? The pass key is 48213` with the needle at a chosen depth; the loss and the exact-match
metric cover only the key digits after the question. Examples are a pure function of (seed, index), so a data
pipeline position is just an integer and resuming is exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxeff.data.text import CharTokenizer, english_corpus

QUESTION = " What is the pass key? The pass key is "


@dataclasses.dataclass(frozen=True)
class PasskeyTask:
    context: int = 256  # total tokens per example
    key_digits: int = 5
    min_depth: float = 0.0
    max_depth: float = 1.0
    tokenizer: CharTokenizer = CharTokenizer()

    def needle(self, key: str) -> str:
        return f" The pass key is {key}. Remember it. {key} is the pass key. "

    def fixed_len(self) -> int:
        return 1 + len(self.needle("0" * self.key_digits)) + len(QUESTION) + self.key_digits

    def __post_init__(self):
        if self.context < self.fixed_len() + 8:
            raise ValueError(f"context {self.context} too short for a passkey example (needs > {self.fixed_len() + 8})")
        if not 0.0 <= self.min_depth <= self.max_depth <= 1.0:
            raise ValueError(f"need 0 <= min_depth <= max_depth <= 1, got {self.min_depth}, {self.max_depth}")

    def example(self, seed: int, index: int, depth: float | None = None) -> dict[str, np.ndarray]:
        """tokens [context], loss_mask [context] (1 where the *next* token is a key digit), key digits."""
        rng = np.random.default_rng([seed, index])
        corpus = english_corpus()
        key = "".join(str(d) for d in rng.integers(0, 10, self.key_digits))
        if key[0] == "0":
            key = str(rng.integers(1, 10)) + key[1:]
        hay_len = self.context - self.fixed_len()
        start = int(rng.integers(0, len(corpus) - hay_len))
        hay = corpus[start : start + hay_len]
        if depth is None:
            depth = float(rng.uniform(self.min_depth, self.max_depth))
        cut = int(round(depth * hay_len))
        text = hay[:cut] + self.needle(key) + hay[cut:] + QUESTION + key
        tok = self.tokenizer
        tokens = np.concatenate([[tok.bos_id], tok.encode(text)]).astype(np.int32)
        assert len(tokens) == self.context
        loss_mask = np.zeros(self.context, np.float32)
        loss_mask[self.context - self.key_digits - 1 : self.context - 1] = 1.0
        return {"tokens": tokens, "loss_mask": loss_mask}

    def batch(self, seed: int, indices, depth: float | None = None) -> dict[str, np.ndarray]:
        items = [self.example(seed, int(i), depth) for i in indices]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}


def answer_exact_match(logits_or_preds: np.ndarray, tokens: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """Per-example exact match of teacher-forced predictions on the key digits. Accepts logits [B,S,V] or
    argmax predictions [B,S]; prediction at position t is for token t+1."""
    preds = logits_or_preds.argmax(-1) if logits_or_preds.ndim == 3 else logits_or_preds
    targets = np.roll(tokens, -1, axis=1)
    ok = (preds == targets) | (loss_mask == 0)
    return ok.all(axis=1)
