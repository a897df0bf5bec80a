"""Gate-training calibration data: the official multi-passkey retrieval recipe over text this machine has.

duo-attention@fe93c31 `duo_attn/data.py:18-270` (`MultiplePasskeyRetrievalDataset`) with the arguments of
`scripts/train.sh` / every released `config.json`: a haystack of long text (officially BookSum; here
`jaxeff.data.english_corpus()`, the Python documentation, repeated when a context needs more, or any text you pass),
10 passkeys of 32 NATO-alphabet words each inserted at 10 sorted depths drawn without replacement from 1000 points
in [0.05, 0.95], context lengths `linspace(1000, 32000, 50)` (Llama-3.1: `context_max=128000`), then the 10
questions with their answers at the end. The labels (`mask`) are every question + passkey + separator token, as the
official loss. One item per context length (50), drawn afresh (depths and passkeys) every time, so 2000 steps at
batch 1 visit each length about 40 times.

Use with any Hugging Face tokenizer (`encode(text, add_special_tokens=...)`) or jaxeff's `CharTokenizer`:

    data = MultiPasskeyData(tokenizer)                       # official sizes (1000-32000 tokens)
    alpha = train_gates(model, data.batches(seed=0), GateTrainConfig())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from jaxeff.checks import require_int, require_number
from jaxeff.data import english_corpus
from jaxeff.data.text import CharTokenizer

NATO = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo", "lima",
        "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
        "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
            "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth",
            "twentieth")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """The official recipe's knobs (defaults: `scripts/train.sh`; the prompt strings are the official ones, the
    needle's "Remeber" typo included, since the released patterns were trained on them). ValueError naming the
    field and its valid range for any value out of range."""

    num_passkeys: int = 10
    passkey_length: int = 32  # NATO words per passkey
    context_min: int = 1000
    context_max: int = 32000
    context_intervals: int = 50
    depth_min: float = 0.05
    depth_max: float = 0.95
    depth_intervals: int = 1000
    buffer_size: int = 300  # the haystack is cut so the longest item stays this far below context_max
    pad_to_multiple_of: int = 16
    needle: str = "Remeber this sequence of words, it's the {ordinal} passkey to the vault: "
    question: str = "Based on the content of the book, what is the {ordinal} passkey to the vault?\nPasskey: "
    prompt1: str = "<|im_start|> This is a very long story book: <book> "
    prompt2: str = " </book>.\n\n"
    separator: str = "\n\n"

    def __post_init__(self):
        name = "CalibrationConfig."
        if require_int(self.num_passkeys, name + "num_passkeys", 1) > len(ORDINALS):
            raise ValueError(f"{name}num_passkeys must be in [1, {len(ORDINALS)}], got {self.num_passkeys}")
        for field in ("passkey_length", "context_min", "context_intervals", "pad_to_multiple_of"):
            require_int(getattr(self, field), name + field, 1)
        require_int(self.context_max, name + "context_max (>= context_min)", self.context_min)
        require_int(self.depth_intervals, name + "depth_intervals (>= num_passkeys)", self.num_passkeys)
        require_int(self.buffer_size, name + "buffer_size", 0)
        require_number(self.depth_min, name + "depth_min", 0.0, 1.0)
        require_number(self.depth_max, name + "depth_max (>= depth_min)", self.depth_min, 1.0)


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    if isinstance(tokenizer, CharTokenizer):
        return ([tokenizer.bos_id] if special else []) + tokenizer.encode(text).tolist()
    return list(tokenizer.encode(text, add_special_tokens=special))


class MultiPasskeyData:
    """The official calibration set for one tokenizer; `example(i, rng)` builds item i, `batches` iterates."""

    def __init__(self, tokenizer, text: str | None = None, config: CalibrationConfig = CalibrationConfig(),
                 seed: int = 0):
        """tokenizer: Hugging Face tokenizer or `CharTokenizer`; text: haystack (default `english_corpus()`),
        repeated until it covers `context_max` tokens; seed: the passkey drawn to size the haystack cut.
        TypeError for a tokenizer without `encode` or a config that is not a `CalibrationConfig`; ValueError for
        an empty text or a context_max that leaves no room for a haystack."""
        if not isinstance(config, CalibrationConfig):
            raise TypeError(f"config must be a CalibrationConfig, got {type(config).__name__}")
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer or a CharTokenizer (with .encode), got "
                            f"{type(tokenizer).__name__}")
        cfg = self.config = config
        self.tokenizer = tokenizer
        text = english_corpus() if text is None else text
        if not text.strip():
            raise ValueError("the haystack text is empty")
        hay = _encode(tokenizer, text)
        reps = -(-cfg.context_max // max(len(hay), 1))
        hay = (hay * reps)[: cfg.context_max]
        n = cfg.num_passkeys
        self.needles = [_encode(tokenizer, cfg.needle.format(ordinal=o)) for o in ORDINALS[:n]]
        self.questions = [_encode(tokenizer, cfg.question.format(ordinal=o)) for o in ORDINALS[:n]]
        self.sep = _encode(tokenizer, cfg.separator)
        self.prompt1 = _encode(tokenizer, cfg.prompt1, special=True)
        self.prompt2 = _encode(tokenizer, cfg.prompt2)
        key = self._passkey(np.random.default_rng(seed))
        other = len(self.prompt1) + len(self.prompt2) + n * (
            2 * len(self.sep) + len(self.needles[0]) + 2 * len(key) + len(self.questions[0]))
        room = cfg.context_max - cfg.buffer_size - other
        if room < 1:
            raise ValueError(f"context_max {cfg.context_max} leaves no room for a haystack ({other} tokens of "
                             f"prompt, needles and questions, buffer {cfg.buffer_size})")
        self.haystack = hay[:room]
        self.lengths = np.linspace(cfg.context_min, cfg.context_max, cfg.context_intervals).astype(np.int64)
        self.depths = np.linspace(cfg.depth_min, cfg.depth_max, cfg.depth_intervals)

    def __len__(self) -> int:
        return len(self.lengths)

    def _passkey(self, rng: np.random.Generator) -> list[int]:
        return _encode(self.tokenizer, " ".join(NATO[i] for i in rng.integers(0, len(NATO),
                                                                             self.config.passkey_length)))

    def example(self, i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Item i (context length `lengths[i]` of haystack, before needles / prompt / questions): {"tokens": int32
        [L], "mask": float32 [L] (1 on the question + passkey + separator tokens), "passkeys": the passkeys' token
        lists, "depths"}. L is a multiple of `pad_to_multiple_of`."""
        cfg = self.config
        hay = self.haystack[: int(self.lengths[i])]
        depths = np.sort(self.depths[rng.permutation(len(self.depths))[: cfg.num_passkeys]])
        keys = [self._passkey(rng) for _ in range(cfg.num_passkeys)]
        context, last = list(self.prompt1), 0
        for needle, key, depth in zip(self.needles, keys, depths):
            cut = int(len(hay) * depth)
            context += hay[last:cut] + self.sep + needle + key + self.sep
            last = cut
        context += hay[last:]
        qa = [t for q, key in zip(self.questions, keys) for t in q + key + self.sep]
        m = cfg.pad_to_multiple_of
        pad = m - (len(context) + len(qa) + len(self.prompt2)) % m  # 1..m tokens, as the official code
        context += self.haystack[len(self.haystack) - pad:] + self.prompt2
        tokens = np.asarray(context + qa, np.int32)
        mask = np.zeros(len(tokens), np.float32)
        mask[len(context):] = 1.0
        return {"tokens": tokens, "mask": mask, "passkeys": keys, "depths": depths}

    def batches(self, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless {"tokens": [1, L], "mask": [1, L]} for `train_gates`: batch 1, the items in a fresh random order
        every epoch (the official DataLoader's shuffle)."""
        rng = np.random.default_rng(seed)
        while True:
            for i in rng.permutation(len(self)):
                ex = self.example(int(i), rng)
                yield {"tokens": ex["tokens"][None], "mask": ex["mask"][None]}
