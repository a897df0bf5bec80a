"""Image conventions shared by the systems: float images in [-1, 1] (DC-AE, HART, ForeAct frames), checked by
dtype, and their float PSNR.

The official DC-AE evaluator's PSNR (on uint8 quantizations) is a different metric: `jaxeff.dcae.metrics.psnr`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxeff.checks import dtype_of


def require_float(x, what: str, expected: str = "float images in [-1, 1]",
                  convert: str = "x.astype(float32) / 127.5 - 1") -> None:
    """Raise ValueError naming `what` and the conversion when `x` has a non-floating dtype (e.g. uint8 [0, 255]
    images given where `expected` is meant: the model would run and return a silently wrong answer). Reads only
    the dtype, so it also works on traced arrays inside jit."""
    dtype = dtype_of(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{what} got {dtype} values; it expects {expected}: convert with {convert}")


def psnr(x, ref):
    """Per-image PSNR in dB of float images in [-1, 1] (data range 2): 10 log10(4 / MSE), the MSE over all axes
    but the first. x, ref [B, ...] -> float32 [B]. The MSE is floored at 4e-10 (PSNR at most 100 dB) so identical
    images give a finite number that a mean over images can carry. For the PSNR of a whole batch as one image (the
    MSE pooled over the batch), pass `x[None], ref[None]`. Raises ValueError on non-float inputs or on differing
    shapes."""
    require_float(x, "psnr")
    require_float(ref, "psnr")
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    if x.shape != ref.shape or x.ndim < 2:
        raise ValueError(f"psnr needs two [B, ...] images of one shape, got {x.shape} and {ref.shape}")
    mse = jnp.mean(jnp.square(x - ref), axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 4e-10))
