"""Input checks shared by every system: each error names the argument and what it should be.

Python scalars (sizes, step counts, rates) are checked with `require_int` / `require_number`; arrays by their dtype
(`dtype_of`, `require_int_array`), which is static and so works under `jax.jit` too. Values of an array can only be
inspected when they are concrete (numpy / Python values, or jax arrays outside a trace): `is_concrete` and
`concrete` say whether and give them. `Registry` is a read-only name -> value mapping whose unknown names raise a
ValueError listing the known ones.

A wrong *type* raises `NotANumberError`, which is both a TypeError and a ValueError (like numpy's `AxisError`,
both a ValueError and an IndexError), so callers catching either keep working; a value out of range raises a
ValueError.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np


class NotANumberError(TypeError, ValueError):
    """A scalar argument of the wrong type (a float where an int is needed, None, a string, a bool)."""


class UnknownNameError(KeyError, ValueError):
    """A name missing from a `Registry`: a ValueError (bad user input) that is also a KeyError, so `in`, `.get` and
    `except KeyError` keep working. Its message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would print the repr of the message


class Registry(Mapping):
    """Read-only name -> value mapping whose unknown names raise `UnknownNameError` ("unknown <kind> 'x'; known:
    [...]") instead of a bare KeyError. `kind` names what the entries are (e.g. "loss", "tau preset")."""

    def __init__(self, kind: str, entries: Mapping):
        self._kind, self._entries = kind, dict(entries)

    def __getitem__(self, name):
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name (e.g. a list)
            raise UnknownNameError(f"unknown {self._kind} {name!r}; known: {sorted(self._entries)}") from None

    def __iter__(self) -> Iterator:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self._kind!r}, {sorted(self._entries)})"


def is_concrete(*xs) -> bool:
    """True when none of `xs` is a tracer (their values can be read here, outside `jax.jit` / `grad` / `vmap`)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def concrete(x) -> np.ndarray | None:
    """`x` as a numpy array when its values are known here, None under a trace."""
    return np.asarray(x) if is_concrete(x) else None


def dtype_of(x) -> np.dtype:
    """The dtype of an array, a tracer or anything `np.asarray` takes (a list, a Python number); never copies a jax
    array to the host."""
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def require_int_array(x, name: str, what: str = "integer ids") -> None:
    """TypeError "<name> must be <what>, got dtype <dtype>" unless `x` has an integer dtype (float ids or a float
    image would be silently truncated). Reads only the dtype, so it also works on traced arrays."""
    dtype = dtype_of(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be {what}, got dtype {dtype}")


def _scalar(value, name: str):
    """A 0-d numpy / JAX array as its Python number (e.g. `mask.mean()`); anything else unchanged.
    NotANumberError for a traced value, whose number cannot be read."""
    if not is_concrete(value):
        raise NotANumberError(f"{name} must be a concrete number, got a traced value (pass it as a static argument)")
    return value.item() if getattr(value, "shape", None) == () and hasattr(value, "item") else value


def require_int(value, name: str, minimum: int | None = None) -> int:
    """`value` as a Python int. Accepts Python and numpy integers and 0-d integer arrays; bool is refused.

    Raises `NotANumberError` (a TypeError and a ValueError) for a non-integer, ValueError for one below `minimum`;
    the message is "<name> must be an integer >= <minimum>, got <value>" ("... must be an integer, got <type>
    <value>" without a minimum)."""
    value = _scalar(value, name)
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if minimum is None:
        if not integral:
            raise NotANumberError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    elif not integral:
        raise NotANumberError(f"{name} must be an integer >= {minimum}, got {value!r}")
    elif value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def require_number(value, name: str, minimum: float = -math.inf, maximum: float = math.inf, *,
                   open_minimum: bool = False) -> float:
    """`value` as a float: a finite real number (bool refused; 0-d arrays accepted) in [minimum, maximum], or in
    (minimum, maximum] with `open_minimum`. Raises `NotANumberError` (a TypeError and a ValueError) for a non-number,
    ValueError for NaN, inf or a value outside the interval: "<name> must be a number in [lo, hi], got <value>"."""
    value = _scalar(value, name)
    interval = f"{'(' if open_minimum else '['}{minimum}, {maximum}{')' if maximum == math.inf else ']'}"
    message = f"{name} must be a number in {interval}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NotANumberError(message)
    if not (math.isfinite(value) and (minimum < value if open_minimum else minimum <= value) and value <= maximum):
        raise ValueError(message)
    return float(value)
