"""Run a function over chunks of an axis in a `lax.map`, so XLA holds one chunk's intermediates at a time.

Used to bound HART's 1024px memory: attention queries of the last scales, the diffusion head's tokens and the
tokenizer decoder's images (`jaxeff.hart.transformer`, `.diffusion`, `.tokenizer`). Chunks are of equal size
(`even_chunk`); the last one is zero-padded and the padding dropped from the result, so the function must treat
rows along the axis independently. Run on CPU only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def even_chunk(n: int, max_chunk: int) -> int:
    """The chunk size for `n` rows in at most `max_chunk` at a time with the fewest chunks and the least padding
    (2304 rows at most 1024: 3 chunks of 768). Raises ValueError for max_chunk < 1."""
    if max_chunk < 1:
        raise ValueError(f"chunk size must be >= 1, got {max_chunk}")
    k = -(-n // max_chunk)
    return -(-n // k)


def map_chunks(fn, xs: tuple, max_chunk: int | None, axis: int = 0):
    """fn(*xs) computed `max_chunk` rows of `axis` at a time (every array in xs has the same length n there; fn's
    outputs, a pytree, carry the rows on the same axis). Equal to fn(*xs) up to float reassociation when rows are
    independent. max_chunk None or >= n: one call."""
    n = xs[0].shape[axis]
    if max_chunk is None or n <= max_chunk:
        return fn(*xs)
    c = even_chunk(n, max_chunk)
    k = -(-n // c)

    def split(x):
        x = jnp.moveaxis(x, axis, 0)
        x = jnp.pad(x, [(0, k * c - n)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(k, c, *x.shape[1:])

    def merge(y):  # [k, ..., c (at axis + 1), ...] -> [..., n (at axis), ...]
        y = jnp.moveaxis(y, 0, axis)
        y = y.reshape(*y.shape[:axis], k * c, *y.shape[axis + 2:])
        return jax.lax.slice_in_dim(y, 0, n, axis=axis)

    out = jax.lax.map(lambda a: fn(*(jnp.moveaxis(x, 0, axis) for x in a)), tuple(split(x) for x in xs))
    return jax.tree.map(merge, out)
