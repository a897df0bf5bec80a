"""Sequence layouts for 2D (ring x Ulysses) sequence parallelism and their causal load balance.

Zigzag partition (derived here, valid for every Ulysses degree U): cut the sequence into 2R equal chunks; ring rank
r owns the ring block [chunk r, chunk 2R-1-r]; that block is then cut into U equal contiguous pieces, one per
Ulysses rank (slot r*U + u, ring-major). Every token lands in exactly one slot, because the ring blocks are a
partition of the chunks and each block is split without overlap. Ulysses gathers the whole ring block before the
ring attention, so the causal balance is decided at ring level only: ring rank r's queries see
(r + 1/2) + (2R - 1 - r + 1/2) = 2R chunk-equivalents of keys, the same for every r. Needs S to be a multiple of
R * lcm(2, U) (of U alone when R = 1, where no zigzag is needed).
"""

from __future__ import annotations

import math

import numpy as np


def length_multiple(ring: int, ulysses: int, zigzag: bool = True) -> int:
    """The multiple a sequence must be padded to for this mesh and layout."""
    if ring < 1 or ulysses < 1:
        raise ValueError(f"ring and ulysses degrees must be >= 1, got {ring}, {ulysses}")
    if not zigzag or ring == 1:
        return ring * ulysses
    return ring * math.lcm(2, ulysses)


def padded_length(seq_len: int, ring: int, ulysses: int, zigzag: bool = True) -> int:
    m = length_multiple(ring, ulysses, zigzag)
    return -(-seq_len // m) * m


def zigzag_permutation(seq_len: int, ring: int, ulysses: int) -> np.ndarray:
    """perm[i] = original position of the token placed at index i of the zigzag-ordered sequence."""
    m = length_multiple(ring, ulysses, zigzag=True)
    if seq_len % m:
        raise ValueError(f"zigzag layout needs seq_len divisible by {m} for ring={ring}, ulysses={ulysses}; "
                         f"got {seq_len} (use padded_length)")
    if ring == 1:
        return np.arange(seq_len)
    c = seq_len // (2 * ring)
    blocks = [np.concatenate([np.arange(r * c, (r + 1) * c), np.arange((2 * ring - 1 - r) * c, (2 * ring - r) * c)])
              for r in range(ring)]
    return np.concatenate(blocks)


def layout_permutation(seq_len: int, ring: int, ulysses: int, zigzag: bool) -> np.ndarray:
    return zigzag_permutation(seq_len, ring, ulysses) if zigzag else np.arange(seq_len)


def causal_work(perm: np.ndarray, ring: int, ulysses: int, num_sub_blocks: int = 2) -> dict[str, np.ndarray]:
    """Causal attention work per device for a token order `perm` (global positions in sequence order).

    Returns per-device arrays (ring-major, R*U entries; the U devices of a ring rank share its work by heads):
    `pairs`: visible (query, key) pairs, the ideal causal work; `executed`: pairs in the sub-blocks the kernel
    actually computes (skips only fully masked sub-blocks), and per ring step the max over devices of executed
    work summed over steps (`critical_path`, the synchronous ring's time), all divided by U.
    """
    s = len(perm)
    block = s // ring
    pos = np.asarray(perm).reshape(ring, block)
    sub = block // num_sub_blocks if block % num_sub_blocks == 0 else block
    n_sub = block // sub
    pairs = np.zeros(ring)
    executed = np.zeros((ring, ring))  # [device ring rank, step]
    for r in range(ring):
        for step in range(ring):
            src = (r - step) % ring
            qp, kp = pos[r], pos[src]
            pairs[r] += np.searchsorted(np.sort(kp), qp, side="right").sum()  # keys at or before each query
            for i in range(n_sub):
                for j in range(n_sub):
                    if qp[i * sub:(i + 1) * sub].max() >= kp[j * sub:(j + 1) * sub].min():
                        executed[r, step] += sub * sub
    per_dev = lambda x: np.repeat(x, ulysses) / ulysses
    return {
        "pairs": per_dev(pairs),
        "executed": per_dev(executed.sum(1)),
        "critical_path": np.full(ring * ulysses, executed.max(0).sum() / ulysses),
    }
