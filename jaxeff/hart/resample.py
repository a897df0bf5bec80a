"""PyTorch-exact `F.interpolate` modes used by the VAR/HART multi-scale quantizer, as separable matrices.

`bicubic` (align_corners=False, A=-0.75, edge-clamped taps) and `area` (adaptive average pooling) are both
separable, so each is a pair of small [out, in] matrices built once in numpy and applied with one einsum. That
keeps the quantizer bit-compatible with the reference tokenizer (jax.image.resize uses a different cubic kernel
and edge handling). Checked against torch on CPU in tests/test_hart_tokenizer.py.
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
    """[n_out, n_in] matrix of adaptive average pooling (torch `mode="area"`) along one axis."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


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
