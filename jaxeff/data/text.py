"""English text that ships with every Python installation (no download), and a character tokenizer.

The corpus is the Python language reference (`pydoc_data.topics`, ~450K characters of English prose), with
digits removed so that numbers placed into it (passkeys) are the only digits a model can see.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np


@functools.lru_cache(maxsize=1)
def english_corpus() -> str:
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    text = text.encode("ascii", "ignore").decode()
    text = re.sub(r"[0-9]", "", text)
    text = re.sub(r"[*=\-^~]{3,}", "", text)  # reST underlines carry no prose
    return re.sub(r"\s+", " ", text)


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """ASCII characters are their own ids (0..127); special tokens follow."""

    specials: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")

    @property
    def vocab_size(self) -> int:
        return 128 + len(self.specials)

    def special(self, name: str) -> int:
        return 128 + self.specials.index(name)

    @property
    def pad_id(self) -> int:
        return self.special("<pad>")

    @property
    def bos_id(self) -> int:
        return self.special("<bos>")

    @property
    def eos_id(self) -> int:
        return self.special("<eos>")

    def encode(self, text: str) -> np.ndarray:
        data = text.encode("ascii", "strict")
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(chr(int(i)) if int(i) < 128 else "" for i in ids)
