"""LPD's value checks on ids and orders (dtype and scalar checks come from `jaxeff.checks`).

Shapes and dtypes are static, so they are checked everywhere, also under `jax.jit`. Values (id ranges, orders
being permutations) are checked only when they are concrete (numpy / Python values, or jax arrays outside a trace);
under `jit` they are tracers and cannot be inspected, and `guard` makes an out-of-range id give NaN (never a
wrapped or clamped row, which would be a silently wrong answer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.checks import concrete


def check_range(x, upper: int, name: str):
    """ValueError if concrete ids fall outside [0, upper), naming how many and the first one."""
    a = concrete(x)
    if a is None or a.size == 0:
        return
    bad = (a < 0) | (a >= upper)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must lie in [0, {upper}): {int(bad.sum())} of {a.size} do not, the first is "
                         f"{a[first]} at index {first if len(first) > 1 else first[0]}")


def guard(ids, upper: int):
    """int32 ids with every id outside [0, upper) replaced by `upper`, which `jnp.take` turns into NaN rows."""
    ids = jnp.asarray(ids, jnp.int32)
    return jnp.where((ids >= 0) & (ids < upper), ids, upper)


def check_permutations(orders, n: int, name: str = "orders"):
    """ValueError naming the first row of concrete `orders` [B, n] that is not a permutation of range(n)."""
    a = concrete(orders)
    if a is None:
        return
    bad = np.flatnonzero((np.sort(a, axis=-1) != np.arange(n)).any(axis=-1))
    if bad.size:
        row = a[bad[0]]
        outside = row[(row < 0) | (row >= n)]
        inside = row[(row >= 0) & (row < n)]
        values, counts = np.unique(inside, return_counts=True)
        what = [f"{outside.size} ids outside [0, {n}) (e.g. {outside[0]})"] if outside.size else []
        if (counts > 1).any():
            what.append(f"{int((counts > 1).sum())} repeated ids (e.g. {values[counts > 1][0]})")
        more = f" (and {bad.size - 1} other rows)" if bad.size > 1 else ""
        raise ValueError(f"{name} rows must be permutations of range({n}); row {bad[0]}{more} has {' and '.join(what)}")


def check_key(key, name: str = "key"):
    """TypeError unless `key` is one PRNG key: `jax.random.key(seed)` or a legacy uint32 [2] `PRNGKey`."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return
    if dtype == jnp.uint32 and shape == (2,):
        return
    got = f"{type(key).__name__}" + (f" {dtype}{list(shape)}" if dtype is not None else f" {key!r}")
    raise TypeError(f"{name} must be one PRNG key such as jax.random.key(0), got {got}")
