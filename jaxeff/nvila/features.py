"""NVILA's Dynamic-S2 scale merge and per-tile projection (NVlabs/VILA `llava/model/llava_arch.py` at b760c34:
`merge_chessboard` :256-280, `split_chessboard` :283-296, `merge_features_for_dynamic_s2` :298-364,
`encode_images` :366-394).

Layouts here are channels-last: ViT features [tiles, tokens, C] with token index = row*g + col inside a tile's
g x g grid (g = 32 for SigLIP-448), feature maps [H, W, C].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxeff.nn.resample import area_matrix


def area_resize(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
    """Area interpolation of a map x [..., H, W, C] to [..., out_h, out_w, C], computed in float32 (the official
    code upcasts for `F.interpolate`) and cast back to x's dtype. Separable: A_h X A_w^T."""
    h, w = x.shape[-3:-1]
    if (h, w) == tuple(out_hw):
        return x
    ah, aw = area_matrix(h, out_hw[0]), area_matrix(w, out_hw[1])
    y = jnp.einsum("oh,...hwc,pw->...opc", ah, x.astype(jnp.float32), aw, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def tile_grid(tokens: int) -> int:
    g = math.isqrt(tokens)
    if g * g != tokens:
        raise ValueError(f"{tokens} tokens per tile is not a square grid")
    return g


def merge_chessboard(tiles: jnp.ndarray, rows: int, cols: int) -> jnp.ndarray:
    """Row-major tiles [rows*cols, g*g, C] -> one map [rows*g, cols*g, C]."""
    n, t, c = tiles.shape
    if n != rows * cols:
        raise ValueError(f"{n} tiles do not fill a {rows}x{cols} grid")
    g = tile_grid(t)
    return tiles.reshape(rows, cols, g, g, c).transpose(0, 2, 1, 3, 4).reshape(rows * g, cols * g, c)


def split_chessboard(x: jnp.ndarray, rows: int, cols: int) -> jnp.ndarray:
    """A map [rows*g, cols*g, C] -> row-major tiles [rows*cols, g*g, C] (inverse of `merge_chessboard`)."""
    h, w, c = x.shape
    if h % rows or w % cols or h // rows != w // cols:
        raise ValueError(f"map {h}x{w} does not split into {rows}x{cols} square tiles")
    g = h // rows
    return x.reshape(rows, g, cols, g, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, g * g, c)


def tiles_per_scale(scales, block_size: tuple[int, int]) -> list[int]:
    """Dynamic-S2 tile counts per scale: (s/s0)^2 for every scale but the last, rows*cols for the last."""
    return [(s // scales[0]) ** 2 for s in scales[:-1]] + [block_size[0] * block_size[1]]


def merge_scales(features: jnp.ndarray, block_size: tuple[int, int], scales=(448, 896, 1344)) -> jnp.ndarray:
    """Dynamic-S2 scale merge: ViT features of one image [n_tiles, g*g, C] in tile order (scale by scale,
    row-major) -> merged map [g*rows, g*cols, len(scales)*C]: each scale's map area-resized to the last scale's map
    and concatenated along channels in scale order."""
    counts = tiles_per_scale(scales, block_size)
    if features.shape[0] != sum(counts):
        raise ValueError(f"expected {sum(counts)} tiles ({counts} per scale) for block size {block_size}, "
                         f"got {features.shape[0]}")
    rows, cols = block_size
    g = tile_grid(features.shape[1])
    grids = [(s // scales[0], s // scales[0]) for s in scales[:-1]] + [(rows, cols)]
    maps, start = [], 0
    for n, (r, c) in zip(counts, grids):
        maps.append(area_resize(merge_chessboard(features[start:start + n], r, c), (g * rows, g * cols)))
        start += n
    return jnp.concatenate(maps, axis=-1)


def encode_dynamic_s2(features: jnp.ndarray, block_size: tuple[int, int], projector, scales=(448, 896, 1344)):
    """One Dynamic-S2 image: ViT features [n_tiles, g*g, C] -> LLM tokens [rows*cols*p*p, D] (p*p tokens per tile
    from `projector`), the per-tile outputs put back into one (p*rows) x (p*cols) grid, flattened row-major."""
    rows, cols = block_size
    projected = projector(split_chessboard(merge_scales(features, block_size, scales), rows, cols))
    merged = merge_chessboard(projected, rows, cols)
    return merged.reshape(-1, merged.shape[-1])


def encode_single_tile(features: jnp.ndarray, projector, repeat: int = 1):
    """Images or frames of one 448 tile each (no Dynamic-S2): features [n, g*g, C] -> [n, p*p, D]. `repeat` copies
    the features along channels ([f, f, f] for 3) so a projector trained on the scale-concatenated width applies."""
    return projector(jnp.concatenate([features] * repeat, axis=-1) if repeat > 1 else features)
