"""Inputs of SparseRefine: low-res logits from any model, the official per-image `.npy` layout, image normalisation.

Official loader: `sparserefine/datasets/cityscapes.py:30-70`. The Cityscapes images and labels themselves come
from `jaxeff.data.cityscapes` (tensorflow-datasets).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxeff.data import require_float

# mmseg Cityscapes normalisation (RGB order), cityscapes.py:30-43.
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def require_normalised(image, what: str) -> None:
    """ValueError naming `what` if `image` is not float: the refiner and the base models take the normalised float
    image (`normalize_image`, as the official loader feeds them), and a uint8 image would run silently wrong."""
    require_float(image, what, "the normalised float image ((x - MEAN) / STD)",
                  "jaxeff.sparserefine.normalize_image(image)")


def upsample_nearest(x, size: tuple[int, int]):
    """cv2.INTER_NEAREST resize of [..., h, w, C] to [..., H, W, C]: source index floor(dst * h / H) (clipped),
    as the official loader resizes the low-res predictions (not the half-pixel-centred jax.image.resize)."""
    h, w = x.shape[-3], x.shape[-2]
    big_h, big_w = size
    if min(h, w, big_h, big_w) < 1:
        raise ValueError(f"cannot resize {x.shape[-3:-1]} to {size}")
    ys = np.minimum(np.floor(np.arange(big_h) * (h / big_h)).astype(np.int64), h - 1)
    xs = np.minimum(np.floor(np.arange(big_w) * (w / big_w)).astype(np.int64), w - 1)
    return jnp.take(jnp.take(jnp.asarray(x), ys, axis=-3), xs, axis=-2)


def logits_from_prediction(pred: np.ndarray, size: tuple[int, int] = (1024, 2048), *,
                           probabilities: bool = False) -> np.ndarray:
    """One official prediction array [C, h, w] -> float32 logits [H, W, C] at `size` (nearest resize).
    probabilities=True (Mask2Former files): log(clip(p, 1e-10)) after the resize, as the official loader."""
    pred = np.asarray(pred, np.float32)
    if pred.ndim != 3:
        raise ValueError(f"prediction must be [C, h, w], got shape {pred.shape}")
    out = np.asarray(upsample_nearest(pred.transpose(1, 2, 0), size))
    if probabilities:
        if out.min() < 0:
            raise ValueError("probabilities=True but the prediction has negative values (logits?)")
        out = np.log(np.clip(out, 1e-10, None))
    return out


def load_prediction(path, size: tuple[int, int] = (1024, 2048), *, probabilities: bool = False) -> np.ndarray:
    """`logits_from_prediction(np.load(path))`: the official `<preds>/<split>/<city>/<name>.npy` files."""
    return logits_from_prediction(np.load(path), size, probabilities=probabilities)


def normalize_image(image, *, bgr: bool = True):
    """uint8 RGB [..., 3] -> float32 (x - MEAN) / STD. bgr=True (official, quirk 5): mmcv.imnormalize(to_rgb=True)
    on an RGB image swaps the channels to BGR after normalising with the RGB-ordered mean / std."""
    x = (jnp.asarray(image, jnp.float32) - jnp.asarray(MEAN)) / jnp.asarray(STD)
    return x[..., ::-1] if bgr else x
