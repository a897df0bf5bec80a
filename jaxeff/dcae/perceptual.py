"""LPIPS-style perceptual distance (VGG16 features, Zhang et al. 2018) from a local weights file.

Nothing is downloaded: the caller passes one safetensors file holding torchvision's VGG16 `features.<i>.weight/bias`
(conv layers 0..28) and the LPIPS linear heads `lin<k>.model.1.weight` (shape [1, C, 1, 1]), i.e. the tensors of
torchvision's `vgg16` and lpips' `weights/v0.1/vgg.pth` saved together. Tested with random weights on CPU only;
not checked against the `lpips` package here (it downloads its backbone at runtime).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.io.safetensors import load_file

# VGG16 `features` conv indices, grouped into the five LPIPS taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def load_lpips_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Read and check the weights file; conv weights come back HWIO, heads as [C]."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"perceptual weights file {path} not found")
    tensors = load_file(path)
    want = [f"features.{i}.{p}" for stage in _STAGES for i in stage for p in ("weight", "bias")]
    want += [f"lin{k}.model.1.weight" for k in range(len(_STAGES))]
    missing = [k for k in want if k not in tensors]
    if missing:
        raise ValueError(f"{path}: not an LPIPS-VGG16 weights file; missing {missing[:8]}")
    out = {}
    for k in want:
        v = np.asarray(tensors[k], np.float32)
        out[k] = v.transpose(2, 3, 1, 0) if v.ndim == 4 and k.startswith("features") else v.reshape(-1)
    return out


def lpips(weights: dict[str, np.ndarray], x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image LPIPS distance of [B, H, W, 3] images in [-1, 1] -> [B]."""
    h = (jnp.concatenate([x, y]).astype(jnp.float32) - _SHIFT) / _SCALE
    total = 0.0
    for k, stage in enumerate(_STAGES):
        if k:
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        for i in stage:
            h = jax.lax.conv_general_dilated(h, weights[f"features.{i}.weight"], (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + weights[f"features.{i}.bias"])
        f = h / (jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True)) + 1e-10)
        fx, fy = jnp.split(f, 2)
        total = total + jnp.mean(jnp.sum((fx - fy) ** 2 * weights[f"lin{k}.model.1.weight"], axis=-1), axis=(1, 2))
    return total
