"""The official group-size schedules (how many tokens each of the K steps generates).

Data from mit-han-lab/lpd `orders/group_sizes_lookup.json` (MIT licence, (c) 2025 MIT HAN Lab), run-length encoded
here ("v*c" = c copies of v). Evaluation uses `GROUP_SIZES[resolution][steps]`; training draws one list per
iteration from `TRAINING_STEPS[resolution]` (the official `group_sizes_training/group_sizes_{256,512}.json` lists are
exactly the lookup entries with those step counts). There is no closed form for the tables.
"""

from __future__ import annotations

import numpy as np

from jaxeff.checks import require_int


def _expand(spec: str) -> tuple[int, ...]:
    out: list[int] = []
    for item in spec.split(","):
        value, _, count = item.strip().partition("*")
        out += [int(value)] * int(count or 1)
    return tuple(out)


# fmt: off
GROUP_SIZES: dict[int, dict[int, tuple[int, ...]]] = {
    256: {
        256: _expand("1*256"),
        128: _expand("1*41, 2*46, 3*41"),
        64: _expand("1*10, 2*7, 3*7, 4*9, 5*11, 6*20"),
        32: _expand("1*2, 2*2, 3*2, 4, 5*2, 6*2, 7*2, 8*2, 9*2, 10*3, 11*4, 12*8"),
        24: _expand("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11*2, 12, 13, 14*3, 15*2, 16*3, 17*2"),
        20: _expand("1, 2, 4, 5, 7, 8, 10, 11, 12, 14, 15, 16, 17, 18*2, 19*2, 20*3"),
        16: _expand("1, 4, 6, 8, 11, 13, 15, 17, 19, 20, 22, 23, 24*3, 25"),
        12: _expand("1, 7, 11, 15, 19, 22, 25, 28, 30, 32, 33*2"),
        8: _expand("1, 15, 24, 32, 40, 45, 49, 50"),
    },
    512: {
        1024: _expand("1*1024"),
        512: _expand("1*162, 2*188, 3*162"),
        256: _expand("1*39, 2*28, 3*31, 4*34, 5*44, 6*80"),
        224: _expand("1*32, 2*21, 3*21, 4*24, 5*27, 6*37, 7*62"),
        192: _expand("1*22, 2*15, 3*16, 4*16, 5*19, 6*21, 7*27, 8*55, 10"),
        160: _expand("1*15, 2*11, 3*10, 4*12, 5*12, 6*13, 7*14, 8*17, 9*23, 10*33"),
        128: _expand("1*10, 2*6, 3*7, 4*7, 5*7, 6*7, 7*8, 8*9, 9*9, 10*11, 11*14, 12*26, 13*7"),
        96: _expand("1*5, 2*4, 3*4, 4*4, 5*3, 6*4, 7*4, 8*5, 9*4, 10*4, 11*6, 12*5, 13*6, 14*7, 15*8, 16*13, 17*10"),
        80: _expand(
            "1*4, 2*2, 3*3, 4*2, 5*3, 6*3, 7*2, 8*3, 9*3, 10*3, 11*3, 12*3, 13*3, 14*4, 15*4, 16*4, 17*6, 18*6, "
            "19*7, 20*12"
        ),
        64: _expand(
            "1*2, 2*2, 3*2, 4, 5*2, 6*2, 7, 8*2, 9*2, 10*2, 11, 12*2, 13*2, 14*2, 15*2, 16*2, 17*2, 18*3, 19*2, "
            "20*3, 21*3, 22*3, 23*5, 24*6, 25*8"
        ),
        56: _expand(
            "1*2, 2, 3, 4*2, 5, 6, 7, 8*2, 9, 10, 11*2, 12, 13, 14*2, 15, 16*2, 17, 18*2, 19*2, 20, 21*2, 22*2, "
            "23*2, 24*2, 25*3, 26*3, 27*5, 28*6, 29*3"
        ),
        48: _expand(
            "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23*2, 24, 25, 26*2, "
            "27, 28*2, 29*2, 30*2, 31*2, 32*3, 33*7, 34"
        ),
        40: _expand(
            "1, 2, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 20, 22, 23, 24, 26, 27, 28, 29, 30, 31, 32, 33, 34, "
            "35*2, 36, 37*2, 38*2, 39*3, 40*4"
        ),
        32: _expand(
            "1, 4, 6, 9, 11, 13, 16, 18, 20, 23, 25, 27, 29, 31, 33, 35, 36, 38, 40, 41, 42, 44, 45, 46, 47, "
            "48*2, 49*2, 50*3"
        ),
    },
}
# fmt: on

# Step counts of the official training schedule lists, in the order of the JSON files.
TRAINING_STEPS: dict[int, tuple[int, ...]] = {
    256: (256, 128, 64, 32, 24, 20, 16, 12, 8),
    512: (1024, 512, 256, 224, 192, 160, 128, 96, 80, 64, 56, 48, 40, 32),
}


def group_sizes(resolution: int, steps: int) -> tuple[int, ...]:
    """The official schedule for `resolution` (256 or 512; image pixels, not tokens) px at `steps` steps.
    Raises TypeError for non-int arguments, ValueError naming what exists for a missing table."""
    resolution, steps = require_int(resolution, "resolution"), require_int(steps, "steps")
    if resolution not in GROUP_SIZES:
        raise ValueError(f"no official schedules for {resolution}px (have {sorted(GROUP_SIZES)}; the resolution is "
                         "in image pixels: the VQ factor, 16 for the released VQ, x the token grid)")
    if steps not in GROUP_SIZES[resolution]:
        have = sorted(GROUP_SIZES[resolution])
        raise ValueError(f"no official {resolution}px schedule with {steps} steps (have {have})")
    return GROUP_SIZES[resolution][steps]


def check_group_sizes(sizes, num_tokens: int) -> tuple[int, ...]:
    """Validate a schedule: a sequence of positive integers summing to `num_tokens`; returns it as a tuple of ints.
    Raises TypeError for a non-sequence (e.g. a step count: use `group_sizes(resolution, steps)`), ValueError
    for non-integral, non-positive or wrongly summing sizes."""
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"group sizes must be a sequence of ints (tokens per step, e.g. group_sizes(256, 20)), "
                        f"got {type(sizes).__name__} {sizes!r}")
    raw = tuple(sizes)
    try:
        values = np.asarray(raw, np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"group sizes must be a sequence of ints, got {raw!r}") from e
    if values.ndim != 1 or (values != np.round(values)).any():
        raise ValueError(f"group sizes must be a flat sequence of whole numbers, got {raw!r}")
    sizes = tuple(int(g) for g in values)
    if not sizes or min(sizes) < 1 or sum(sizes) != num_tokens:
        raise ValueError(f"group sizes must be positive and sum to {num_tokens}, got {sizes} (sum {sum(sizes)})")
    return sizes


def cumsum(sizes) -> np.ndarray:
    """[K + 2] int32 boundaries [0, 1, 1 + g1, ..., 1 + N]: slot 0 is the class slot, slot 1 + k token k."""
    return np.concatenate([[0, 1], 1 + np.cumsum(sizes)]).astype(np.int32)


def step_of(sizes) -> np.ndarray:
    """[N] int32: the 1-based group (step) that generates each generation index."""
    return np.repeat(np.arange(1, len(sizes) + 1, dtype=np.int32), sizes)
