"""2-D sparse tensors with static capacity: points, dense index maps, neighbour tables, the strided-site rule.

A level holds up to `capacity` active pixels of a [B, H, W] grid: coordinates (b, y, x) in row-major order (the
order of `torch.nonzero(mask)`, which the official featurizer uses), a validity mask and a dense int32 index map
(point id, -1 = empty) kept on device. Every sparse conv is `gather_matmul(features, table, weight)`
(`pallas_kernels.sparse_conv`) with a table built here:

- submanifold 3x3 (stride 1, TorchSparse's stride-1 `Conv3d`): output sites = input sites,
  table[i, k] = index[b, y + dy_k, x + dx_k], offsets k = (dy, dx) row-major over {-1, 0, 1}^2;
- strided 3x3, stride 2, padding 0: output o gathers inputs at 2 * o + k, k = (ky, kx) in {0, 1, 2}^2 (row-major);
- transposed 3x3, stride 2, onto the cached finer level: fine x gathers coarse o = (x - k) / 2 with the same k.

Coarse sites (`DOWNSAMPLE_MODES`):
- "spconv" (official: TorchSparse's default `downsample_mode`, `torchsparse/nn/functional/conv/kmap/downsample.py`
  and `backend/others/downsample_cuda.cu`): o exists iff some active x and k in {0, 1, 2} give o = (x - k) / 2
  integral, o >= 0 and o <= (x_max - 2) // 2, per spatial axis, x_max the largest active coordinate on that axis
  over the whole batch (`coords_max`). A slightly dilated set.
- "floor" (MinkowskiEngine style, an option): o = floor(x / 2), unique.

Capacity: `jnp.nonzero(size=capacity)` keeps the first `capacity` sites; `overflow` records whether any were
dropped, and `check_capacity` turns it into a `CapacityError` (ValueError) on the host.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DOWNSAMPLE_MODES = ("spconv", "floor")
SUBM_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
STRIDED_OFFSETS = tuple((ky, kx) for ky in (0, 1, 2) for kx in (0, 1, 2))


class CapacityError(ValueError):
    """More active sites than the static capacity of a level."""


@struct.dataclass
class Level:
    """One resolution level. coords int32 [cap, 3] (b, y, x; zeros in empty slots), valid bool [cap], count int32
    [] (active sites wanted, may exceed cap), index int32 [B, H, W] (point id or -1)."""

    coords: jax.Array
    valid: jax.Array
    count: jax.Array
    index: jax.Array

    @property
    def capacity(self) -> int:
        return self.valid.shape[0]

    @property
    def overflow(self) -> jax.Array:
        return self.count > self.capacity


def level_from_mask(mask, capacity: int) -> Level:
    """Active sites of a bool mask [B, H, W] (row-major order), at most `capacity` of them kept."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be [B, H, W], got shape {mask.shape}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    b, h, w = mask.shape
    flat = mask.reshape(-1)
    (ids,) = jnp.nonzero(flat, size=capacity, fill_value=0)
    count = jnp.sum(flat, dtype=jnp.int32)
    valid = jnp.arange(capacity) < count
    coords = jnp.stack(jnp.unravel_index(ids, (b, h, w)), axis=-1).astype(jnp.int32)
    coords = jnp.where(valid[:, None], coords, 0)
    index = jnp.full((b * h * w,), -1, jnp.int32)
    index = index.at[jnp.where(valid, ids, b * h * w)].set(jnp.arange(capacity, dtype=jnp.int32), mode="drop")
    return Level(coords, valid, count, index.reshape(b, h, w))


def _lookup(index, b, y, x, ok):
    """index[b, y, x] where ok and inside the grid, else -1 (all arguments broadcast together)."""
    _, h, w = index.shape
    inside = ok & (y >= 0) & (y < h) & (x >= 0) & (x < w)
    val = index[b, jnp.clip(y, 0, h - 1), jnp.clip(x, 0, w - 1)]
    return jnp.where(inside, val, -1)


def _offsets(offsets):
    dy, dx = np.asarray(offsets, np.int32).T
    return jnp.asarray(dy)[None, :], jnp.asarray(dx)[None, :]  # [1, 9]: one gather for all offsets


def subm_table(level: Level) -> jax.Array:
    """Neighbour table int32 [cap, 9] of the 3x3 submanifold conv on `level` (offsets `SUBM_OFFSETS`)."""
    b, y, x = (c[:, None] for c in level.coords.T)
    dy, dx = _offsets(SUBM_OFFSETS)
    return _lookup(level.index, b, y + dy, x + dx, level.valid[:, None])


def coarse_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Grid of a stride-2, kernel-3, padding-0 conv: (S - 3) // 2 + 1 per axis (at least 1, possibly empty)."""
    b, h, w = shape
    return b, max((h - 3) // 2 + 1, 1), max((w - 3) // 2 + 1, 1)


def coarse_mask(mask, mode: str = "spconv") -> jax.Array:
    """bool [B, Ho, Wo] (`coarse_shape`) of the coarse sites of the active sites of `mask` bool [B, H, W].

    Computed densely (a 3x3 stride-2 window OR for "spconv", 2x2 for "floor") rather than by scattering each
    point's candidate sites: the same set, cheaper at high resolution, and it needs no capacity, so the counts of
    every level are known before any capacity is chosen (`pyramid_counts`)."""
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample mode must be one of {DOWNSAMPLE_MODES}, got {mode!r}")
    if mask.ndim != 3:
        raise ValueError(f"mask must be [B, H, W], got shape {mask.shape}")
    _, h, w = mask.shape
    _, ho, wo = coarse_shape(mask.shape)
    mask = mask.astype(bool)
    # spconv: o gathers x = 2o + k, k in {0, 1, 2} (window 3, stride 2); floor: o = x // 2 (window 2, stride 2).
    win = 3 if mode == "spconv" else 2
    need_h, need_w = 2 * ho + win - 2, 2 * wo + win - 2  # rows / cols the Ho x Wo windows read
    m = jnp.pad(mask[:, :need_h, :need_w], ((0, 0), (0, max(need_h - h, 0)), (0, max(need_w - w, 0))))
    occ = jax.lax.reduce_window(m, False, jax.lax.bitwise_or, (1, win, win), (1, 2, 2), "VALID")
    if mode == "floor":
        return occ
    # spconv bound o <= (x_max - 2) // 2 per axis, x_max the largest active coordinate over the batch (coords_max).
    ymax = (jnp.max(jnp.where(jnp.any(mask, axis=(0, 2)), jnp.arange(h), -1)) - 2) // 2
    xmax = (jnp.max(jnp.where(jnp.any(mask, axis=(0, 1)), jnp.arange(w), -1)) - 2) // 2
    inside = (jnp.arange(ho)[:, None] <= ymax) & (jnp.arange(wo)[None, :] <= xmax)
    return occ & inside[None]


def level_masks(mask, num_levels: int, mode: str = "spconv") -> tuple[jax.Array, ...]:
    """The dense site masks of every level, finest first: mask, coarse_mask(mask), ... (`num_levels` of them)."""
    masks = [mask.astype(bool)]
    for _ in range(num_levels - 1):
        masks.append(coarse_mask(masks[-1], mode))
    return tuple(masks)


def pyramid_counts(mask, num_levels: int, mode: str = "spconv") -> jax.Array:
    """int32 [num_levels]: active sites per level of the pyramid `build_pyramid` makes from `mask` bool [B, H, W]
    (needs no capacity; read it on the host to choose capacities, e.g. with `bucket_capacities`)."""
    return jnp.stack([jnp.sum(m, dtype=jnp.int32) for m in level_masks(mask, num_levels, mode)])


def down_table(fine: Level, coarse: Level) -> jax.Array:
    """int32 [cap_coarse, 9]: fine point at 2 * o + k for each coarse site o (stride-2 conv, padding 0)."""
    b, y, x = (c[:, None] for c in coarse.coords.T)
    ky, kx = _offsets(STRIDED_OFFSETS)
    return _lookup(fine.index, b, 2 * y + ky, 2 * x + kx, coarse.valid[:, None])


def up_table(fine: Level, coarse: Level) -> jax.Array:
    """int32 [cap_fine, 9]: coarse site o = (x - k) / 2 for each fine point x (transposed stride-2 conv back onto
    the cached fine sites; the transpose of `down_table`)."""
    b, y, x = (c[:, None] for c in fine.coords.T)
    ky, kx = _offsets(STRIDED_OFFSETS)
    dy, dx = y - ky, x - kx
    ok = fine.valid[:, None] & (dy % 2 == 0) & (dx % 2 == 0)
    return _lookup(coarse.index, b, dy // 2, dx // 2, ok)


@struct.dataclass
class Pyramid:
    """Levels (finest first) and their tables: subm[i] [cap_i, 9], down[i] [cap_{i+1}, 9] (level i -> i+1),
    up[i] [cap_i, 9] (level i+1 -> i)."""

    levels: tuple[Level, ...]
    subm: tuple[jax.Array, ...]
    down: tuple[jax.Array, ...]
    up: tuple[jax.Array, ...]

    @property
    def overflow(self) -> jax.Array:
        return jnp.any(jnp.stack([lv.overflow for lv in self.levels]))

    @property
    def counts(self) -> jax.Array:
        return jnp.stack([lv.count for lv in self.levels])


def level_capacities(capacity: int, num_levels: int, shape: tuple[int, int, int],
                     coarse_ratio: float = 1.0) -> tuple[int, ...]:
    """Static capacity per level: level 0 gets `capacity`; level i+1 gets ceil(ratio * cap_i), at most its grid.

    The spconv rule can make a coarse level larger than its fine one for scattered points (up to 4 sites per
    isolated pixel); raise `coarse_ratio` if `check_capacity` reports an overflow."""
    caps, grid = [int(capacity)], tuple(shape)
    for _ in range(num_levels - 1):
        grid = coarse_shape(grid)
        caps.append(max(1, min(int(np.ceil(caps[-1] * coarse_ratio)), int(np.prod(grid)))))
    return tuple(caps)


def bucket_capacities(counts, shape: tuple[int, int, int], *, minimum: int = 1024, growth: float = 1.25,
                      align: int = 128) -> tuple[int, ...]:
    """Static capacity per level from host-side site counts (`pyramid_counts`): the smallest rung >= count of the
    ladder minimum * growth^i (rounded up to `align`), at most the level's grid. A static-shape program is compiled
    once per rung, so a stream of images with varying selections compiles a few programs and pads at most
    `growth` - 1 (25%) instead of sizing every call for the worst case.

    Raises ValueError on minimum < 1, growth <= 1 or align < 1."""
    if minimum < 1 or growth <= 1 or align < 1:
        raise ValueError(f"need minimum >= 1, growth > 1, align >= 1; got {minimum}, {growth}, {align}")
    caps, grid = [], tuple(shape)
    for i, count in enumerate(np.asarray(counts).tolist()):
        if i:
            grid = coarse_shape(grid)
        cap = minimum
        while cap < count:
            cap = align * math.ceil(cap * growth / align)
        caps.append(min(cap, int(np.prod(grid))))
    return tuple(caps)


def build_pyramid(mask, capacities: tuple[int, ...], mode: str = "spconv") -> Pyramid:
    """All levels and tables of a U-Net with len(capacities) levels, from the selection mask bool [B, H, W].

    Coarse sites come from the whole mask (`level_masks`), so when a level overflows, the coarser ones still
    hold the sites of the dropped points; an overflow is an error anyway (`check_capacity`)."""
    levels = tuple(level_from_mask(m, cap) for m, cap in zip(level_masks(mask, len(capacities), mode), capacities))
    pairs = list(zip(levels[:-1], levels[1:]))
    return Pyramid(levels, tuple(subm_table(lv) for lv in levels),
                   tuple(down_table(f, c) for f, c in pairs), tuple(up_table(f, c) for f, c in pairs))


def check_capacity(overflow, counts=None, capacities=None) -> None:
    """Raises CapacityError if `overflow` (a concrete bool) is set; counts / capacities name the levels."""
    if isinstance(overflow, jax.core.Tracer):
        raise TypeError("check_capacity needs concrete values: call it outside jit on the returned flag")
    if bool(np.asarray(overflow)):
        detail = ""
        if counts is not None and capacities is not None:
            detail = "; ".join(f"level {i}: {int(c)} sites, capacity {cap}"
                               for i, (c, cap) in enumerate(zip(np.asarray(counts), capacities)) if int(c) > cap)
        raise CapacityError(f"sparse capacity exceeded ({detail}); raise capacity / coarse_ratio or the selector "
                            f"threshold")


__all__ = ["DOWNSAMPLE_MODES", "SUBM_OFFSETS", "STRIDED_OFFSETS", "CapacityError", "Level", "Pyramid",
           "bucket_capacities", "build_pyramid", "check_capacity", "coarse_mask", "coarse_shape", "down_table",
           "level_capacities", "level_from_mask", "level_masks", "pyramid_counts", "subm_table", "up_table"]
