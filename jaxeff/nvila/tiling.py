"""NVILA image preprocessing on the host: the SigLIP processor, Dynamic-S2 tiling (NVILA) and dynamic tiling
(NVILA-Lite), as in NVlabs/VILA `llava/mm_utils.py` (`find_closest_aspect_ratio` :283-296, `dynamic_preprocess`
:299-338, `dynamic_s2_preprocess` :341-405) at b760c34.

Tiles are cut from `PIL.Image.resize` outputs (Pillow's default filter for RGB, bicubic with antialiasing when
shrinking), exactly as the official code does, so tiles match it byte for byte under the same Pillow version.
All tile arrays are uint8 [n, size, size, 3] (HWC, RGB); grids are (rows, cols).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIGLIP_SIZE = 448

# SigLIP processor (size 448, rescale 1/255, mean = std = 0.5) as a per-level lookup: float32(v)/255*2-1 equals the
# processor's float32 arithmetic for every uint8 value (checked against the golden LUT).
SIGLIP_LUT = (np.arange(256, dtype=np.float32) / np.float32(255) * np.float32(2) - np.float32(1)).astype(np.float32)


def to_pil(image) -> Image.Image:
    """PIL image or uint8 array [H, W, 3] -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be a PIL image or a uint8 [H, W, 3] array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr, "RGB")


def siglip_pixels(tiles: np.ndarray) -> np.ndarray:
    """uint8 tiles [n, 448, 448, 3] -> SigLIP pixel values float32 [n, 448, 448, 3] in [-1, 1] (NHWC)."""
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8, got {tiles.dtype}")
    return SIGLIP_LUT[tiles]


def siglip_preprocess(image, size: int = SIGLIP_SIZE) -> np.ndarray:
    """One image -> float32 [1, size, size, 3]: bicubic resize to size x size (aspect ignored), x/255, (x-0.5)/0.5."""
    return siglip_pixels(np.asarray(to_pil(image).resize((size, size)))[None])


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) grids with min_num <= cols*rows <= max_num, in the official iteration order: the order of a
    CPython set of small-int tuples built over n = min_num..max_num, then a stable sort by area. The order only
    matters for exact aspect-ratio ties."""
    grids = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_num <= i * j <= max_num}
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], size: int = SIGLIP_SIZE) -> tuple[int, int]:
    """InternVL's rule: the (cols, rows) grid whose cols/rows is closest to width/height; on an exact tie a later
    grid replaces the current one only if the image area exceeds half the grid's pixel area."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def _cut(image: Image.Image, cols: int, rows: int, size: int) -> list[np.ndarray]:
    """Resize to (size*cols, size*rows) and cut row-major into size x size tiles."""
    arr = np.asarray(image.resize((size * cols, size * rows)))
    return [arr[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]


def dynamic_s2_tiles(image, scales=(448, 896, 1344), max_tiles: int = 12) -> tuple[np.ndarray, tuple[int, int]]:
    """NVILA Dynamic-S2: -> (tiles uint8 [n, s0, s0, 3], (rows, cols) of the last scale).

    Scales but the last: the whole image squashed to a square of side s and cut into (s/s0)^2 tiles. Last scale:
    the closest-aspect grid with (s_last/s0)^2 <= cols*rows <= max_tiles. Tile order: scale by scale, row-major.
    """
    s0 = scales[0]
    if any(s % s0 for s in scales):
        raise ValueError(f"every scale must be a multiple of the first, got {scales}")
    image = to_pil(image)
    tiles = []
    for s in scales[:-1]:
        tiles += _cut(image, s // s0, s // s0, s0)
    min_num = (scales[-1] // s0) ** 2
    if max_tiles < min_num:
        raise ValueError(f"max_tiles {max_tiles} is below the last scale's {min_num} tiles")
    cols, rows = closest_grid(*image.size, candidate_grids(min_num, max_tiles), s0)
    tiles += _cut(image, cols, rows, s0)
    return np.stack(tiles), (rows, cols)


def dynamic_tiles(image, min_tiles: int = 1, max_tiles: int = 12, size: int = SIGLIP_SIZE,
                  thumbnail: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """NVILA-Lite dynamic tiling: -> (tiles uint8 [n, size, size, 3], (rows, cols)); the closest-aspect grid with
    min_tiles..max_tiles tiles, row-major, plus a size x size thumbnail of the whole image appended last when the
    grid has more than one tile."""
    image = to_pil(image)
    cols, rows = closest_grid(*image.size, candidate_grids(min_tiles, max_tiles), size)
    tiles = _cut(image, cols, rows, size)
    if thumbnail and len(tiles) != 1:
        tiles.append(np.asarray(image.resize((size, size))))
    return np.stack(tiles), (rows, cols)
