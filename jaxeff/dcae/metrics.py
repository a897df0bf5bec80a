"""Reconstruction metrics as the official DC-AE evaluator computes them (efficientvit `aecore/evaluator.py`).

Both images go to uint8 by `(255 * (x + 1) / 2 + 0.5).clamp(0, 255)` then truncation; then, per image:
- PSNR: `10 log10(255^2 / MSE)` on the uint8 values (efficientvit `apps/metrics/psnr/psnr.py`);
- SSIM: torchmetrics `StructuralSimilarityIndexMeasure(data_range=(0, 255))`: 11x11 Gaussian window, sigma 1.5,
  K1 0.01, K2 0.03, images reflect-padded by 5, mean of the SSIM map over channels and all pixels (torchmetrics
  >= 1.4.2, which a `pip install` gave when the evaluator was released, 2024-10; <= 1.4.1 averaged only the
  pixels whose window lies inside the image, torchmetrics #2718);
- LPIPS: torchmetrics `LearnedPerceptualImagePatchSimilarity(normalize=True)` (AlexNet) on uint8 / 255, given its
  weights (`jaxeff.dcae.perceptual`).
The evaluator averages each over images. scikit-image's SSIM defaults (7x7 uniform window) give other numbers; a
metric computed another way is not comparable with the README table. Parity with torchmetrics 1.9 is tested on CPU
(tests/test_dcae_metrics.py). Images are [B, H, W, 3] (NHWC), any float dtype, in [-1, 1]; integer images raise a
ValueError (uint8 images: `ssim_uint8`, or convert with x / 127.5 - 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.data import require_float
from jaxeff.dcae import perceptual

SSIM_SIGMA, SSIM_K1, SSIM_K2 = 1.5, 0.01, 0.03
SSIM_WINDOW = int(3.5 * SSIM_SIGMA + 0.5) * 2 + 1  # torchmetrics derives the Gaussian window size from sigma: 11


def quantize_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] float images -> uint8 as the evaluator does: `+ 0.5` then truncation (not round-half-to-even).
    Integer input (already uint8?) raises a ValueError."""
    require_float(x, "dcae.metrics (quantize_uint8)", convert="x / 127.5 - 1, or use ssim_uint8 for uint8 images")
    return jnp.clip(255.0 * ((x.astype(jnp.float32) + 1.0) / 2.0) + 0.5, 0.0, 255.0).astype(jnp.uint8)


def psnr(x: jax.Array, ref: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of [B, H, W, C] images in [-1, 1] on their uint8 quantizations -> [B] float32 (inf
    where the quantized images are equal, as in the official code)."""
    d = quantize_uint8(x).astype(jnp.float32) - quantize_uint8(ref).astype(jnp.float32)
    mse = jnp.mean(d * d, axis=(1, 2, 3))
    return 10.0 * jnp.log10(255.0**2 / mse)


def _gaussian_1d() -> np.ndarray:
    d = np.arange((1 - SSIM_WINDOW) / 2, (1 + SSIM_WINDOW) / 2, 1.0, dtype=np.float32)
    g = np.exp(-((d / SSIM_SIGMA) ** 2) / 2)
    return (g / g.sum()).astype(np.float32)


def ssim_uint8(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-image SSIM of [B, H, W, C] uint8 (or 0..255-valued) images -> [B] float32, torchmetrics' formula with
    data range 255. H and W must exceed 5 (the reflect padding)."""
    pad = SSIM_WINDOW // 2
    if min(a.shape[1:3]) <= pad:
        raise ValueError(f"SSIM needs images larger than {pad}x{pad} (reflect padding), got {a.shape[1:3]}")
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    g = jnp.asarray(_gaussian_1d())

    def blur(x):  # separable Gaussian, reflect-padded so every pixel gets a window
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        c = x.shape[-1]
        x = jax.lax.conv_general_dilated(x, jnp.tile(g[:, None, None, None], (1, 1, 1, c)), (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
                                         precision=jax.lax.Precision.HIGHEST)
        return jax.lax.conv_general_dilated(x, jnp.tile(g[None, :, None, None], (1, 1, 1, c)), (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
                                            precision=jax.lax.Precision.HIGHEST)

    mu_a, mu_b, aa, bb, ab = (blur(t) for t in (a, b, a * a, b * b, a * b))
    var_a = jnp.maximum(aa - mu_a**2, 0.0)
    var_b = jnp.maximum(bb - mu_b**2, 0.0)
    cov = ab - mu_a * mu_b
    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def ssim(x: jax.Array, ref: jax.Array) -> jax.Array:
    """Per-image SSIM of [B, H, W, C] images in [-1, 1] after the evaluator's uint8 quantization -> [B]."""
    return ssim_uint8(quantize_uint8(x), quantize_uint8(ref))


def lpips(weights: dict[str, np.ndarray], x: jax.Array, ref: jax.Array) -> jax.Array:
    """Per-image LPIPS of [B, H, W, 3] images in [-1, 1] on their uint8 quantizations -> [B] (the evaluator feeds
    uint8 / 255 with normalize=True, i.e. uint8 mapped back to [-1, 1])."""
    def back(v):
        return quantize_uint8(v).astype(jnp.float32) / 255.0 * 2.0 - 1.0

    return perceptual.lpips(weights, back(x), back(ref))


@jax.jit
def _psnr_ssim(x, ref):
    return psnr(x, ref), ssim(x, ref)


def reconstruction_metrics(recons, images, lpips_weights: dict[str, np.ndarray] | None = None,
                           batch: int = 8) -> dict[str, float]:
    """Official PSNR / SSIM (and LPIPS when `lpips_weights` is given) averaged over [N, H, W, 3] image pairs in
    [-1, 1], computed `batch` images at a time."""
    if np.shape(recons) != np.shape(images):
        raise ValueError(f"reconstructions {np.shape(recons)} and images {np.shape(images)} differ in shape")
    require_float(recons, "reconstruction_metrics (reconstructions)")
    require_float(images, "reconstruction_metrics (images)")
    out = {"PSNR": [], "SSIM": []} | ({"LPIPS": []} if lpips_weights is not None else {})
    lp = jax.jit(lpips) if lpips_weights is not None else None
    for i in range(0, len(images), batch):
        x, ref = jnp.asarray(recons[i : i + batch]), jnp.asarray(images[i : i + batch])
        p, s = _psnr_ssim(x, ref)
        out["PSNR"].append(np.asarray(p))
        out["SSIM"].append(np.asarray(s))
        if lp is not None:
            out["LPIPS"].append(np.asarray(lp(lpips_weights, x, ref)))
    return {k: float(np.mean(np.concatenate(v))) for k, v in out.items()}
