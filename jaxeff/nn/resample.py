"""PyTorch-exact `F.interpolate` modes as separable matrices: `bicubic` (align_corners=False, A=-0.75,
edge-clamped taps) and `area` (adaptive average pooling).

Each is a pair of small [out, in] matrices built once in numpy and applied with one einsum, so ports stay
bit-compatible with torch references where `jax.image.resize` is not (it uses a different cubic kernel and edge
handling). Used by HART's multi-scale quantizer, NVILA's Dynamic-S2 scale merge and LPD's position-embedding
interpolation; checked against torch in tests/test_hart_parts.py, tests/test_nvila.py and tests/test_lpd.py.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

_A = -0.75  # PyTorch's bicubic coefficient


def _cubic1(x: float) -> float:
    return ((_A + 2) * x - (_A + 3)) * x * x + 1


def _cubic2(x: float) -> float:
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A


@functools.cache
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of torch bicubic interpolation (align_corners=False) along one axis."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5  # cubic mode does not clamp negative source coordinates
        base = int(np.floor(src))
        t = src - base
        coeffs = (_cubic2(t + 1), _cubic1(t), _cubic1(1 - t), _cubic2(2 - t))
        for k, c in enumerate(coeffs):
            m[i, min(max(base - 1 + k, 0), n_in - 1)] += c
    return m.astype(np.float32)


@functools.cache
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """float32 [n_out, n_in] averaging matrix of `F.interpolate(mode="area")` (= adaptive average pooling) along
    one axis: output i averages inputs floor(i*n_in/n_out) .. ceil((i+1)*n_in/n_out) - 1. ValueError for a size
    < 1."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m.astype(np.float32)


def _apply(x, mh: np.ndarray, mw: np.ndarray):
    """x: [B, H, W, C] -> [B, H', W', C]."""
    return jnp.einsum("oh,bhwc,pw->bopc", jnp.asarray(mh, x.dtype), x, jnp.asarray(mw, x.dtype))


def resize(x, size: int, mode: str):
    """Resize NHWC `x` (square) to `size`x`size` with torch semantics; identity when the size already matches."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (size, size):
        return x
    if mode == "bicubic":
        return _apply(x, bicubic_matrix(h, size), bicubic_matrix(w, size))
    if mode == "area":
        return _apply(x, area_matrix(h, size), area_matrix(w, size))
    raise ValueError(f"unknown resize mode {mode!r}; expected 'bicubic' or 'area'")
