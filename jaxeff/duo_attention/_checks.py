"""Argument checks shared by DuoAttention's modules: each names the argument and its valid range."""

from __future__ import annotations

import math
import numbers


def _scalar(value):
    """A 0-d numpy / JAX array as its Python number (e.g. `mask.mean()`); anything else unchanged."""
    return value.item() if getattr(value, "shape", None) == () and hasattr(value, "item") else value


def check_int(name: str, value, low: int) -> int:
    """value as an int; ValueError unless it is an integer (bool excluded) >= low."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_number(name: str, value, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    """value as a float; ValueError unless it is a finite real number in [low, high] ((low, high] with low_open)."""
    value = _scalar(value)
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high == math.inf else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)
