"""Synthetic video needle-in-a-haystack (the LongVILA / LongVA V-NIAH protocol at toy scale).

A video is `num_frames` noise frames with one needle frame at depth d (frame index round(d * (F - 1))); the needle
is one of `num_needles` fixed random +-1 patterns. The text is one question token; the target at the question
position is the needle's id (token 0..num_needles-1). Examples are a pure function of the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxeff.longvila.vlm import VideoBatch


@dataclasses.dataclass(frozen=True)
class NeedleTask:
    image_size: int = 16
    num_needles: int = 10
    noise_scale: float = 0.5
    template_seed: int = 1234

    @property
    def question_token(self) -> int:
        return self.num_needles

    @property
    def vocab_size(self) -> int:
        return self.num_needles + 1

    def templates(self) -> np.ndarray:
        rng = np.random.default_rng(self.template_seed)
        return rng.choice([-1.0, 1.0], size=(self.num_needles, self.image_size, self.image_size, 3)).astype(np.float32)

    def batch(self, rng: np.random.Generator, batch: int, num_frames, depth: float | None = None) -> VideoBatch:
        """`num_frames` an int or a [batch] array (frames padded to the max); `depth` None = uniform random."""
        nf = np.broadcast_to(np.asarray(num_frames, np.int32), (batch,)).copy()
        if nf.min() < 1:
            raise ValueError(f"num_frames must be >= 1, got {nf.min()}")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        f = int(nf.max())
        s = self.image_size
        frames = (self.noise_scale * rng.standard_normal((batch, f, s, s, 3))).astype(np.float32)
        answers = rng.integers(0, self.num_needles, batch)
        d = rng.random(batch) if depth is None else np.full(batch, depth)
        where = np.rint(d * (nf - 1)).astype(np.int64)
        frames[np.arange(batch), where] = self.templates()[answers]
        return VideoBatch(frames=frames, num_frames=nf, text=np.full((batch, 1), self.question_token, np.int32),
                          text_len=np.ones(batch, np.int32), targets=answers[:, None].astype(np.int32))
