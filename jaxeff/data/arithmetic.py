"""Small verifiable tasks over digits: addition and digit reversal (for RL and quick training checks)."""

from __future__ import annotations

import dataclasses

import numpy as np

# vocabulary: digits 0-9, then symbols
PLUS, EQUALS, REVERSE, PAD = 10, 11, 12, 13
VOCAB_SIZE = 14


@dataclasses.dataclass(frozen=True)
class DigitTask:
    """`a + b =` -> digits of a+b (op="add") or `REVERSE d1..dn =` -> dn..d1 (op="reverse").

    prompt and answer are fixed-length digit sequences (answers zero-padded on the left), so batches are dense
    arrays and the reward is exact match."""

    op: str = "add"
    num_digits: int = 3

    def __post_init__(self):
        if self.op not in ("add", "reverse"):
            raise ValueError(f"op must be 'add' or 'reverse', got {self.op!r}")
        if self.num_digits < 1:
            raise ValueError("num_digits must be >= 1")

    @property
    def prompt_len(self) -> int:
        return 2 * self.num_digits + 2 if self.op == "add" else self.num_digits + 2

    @property
    def answer_len(self) -> int:
        return self.num_digits + 1 if self.op == "add" else self.num_digits

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """prompts [batch, prompt_len], answers [batch, answer_len] (int32)."""
        n = self.num_digits
        digits = rng.integers(0, 10, size=(batch, 2 * n if self.op == "add" else n))
        if self.op == "reverse":
            prompts = np.concatenate([np.full((batch, 1), REVERSE), digits, np.full((batch, 1), EQUALS)], 1)
            return prompts.astype(np.int32), digits[:, ::-1].astype(np.int32)
        a, b = digits[:, :n], digits[:, n:]
        prompts = np.concatenate([a, np.full((batch, 1), PLUS), b, np.full((batch, 1), EQUALS)], 1)
        value = _to_int(a) + _to_int(b)
        return prompts.astype(np.int32), _to_digits(value, n + 1)


def _to_int(d: np.ndarray) -> np.ndarray:
    return (d * (10 ** np.arange(d.shape[1] - 1, -1, -1))).sum(1)


def _to_digits(v: np.ndarray, width: int) -> np.ndarray:
    return ((v[:, None] // (10 ** np.arange(width - 1, -1, -1))) % 10).astype(np.int32)
