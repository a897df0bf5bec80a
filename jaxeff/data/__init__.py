"""Data: grain pipelines, synthetic tasks (passkey retrieval over real English text, digit arithmetic), and the
[-1, 1] float image convention (`require_float`, `psnr`)."""

from jaxeff.data.arithmetic import DigitTask
from jaxeff.data.images import psnr, require_float
from jaxeff.data.passkey import PasskeyTask, answer_exact_match
from jaxeff.data.pipeline import index_batches
from jaxeff.data.text import CharTokenizer, english_corpus

__all__ = ["DigitTask", "PasskeyTask", "answer_exact_match", "index_batches", "CharTokenizer", "english_corpus",
           "psnr", "require_float"]
