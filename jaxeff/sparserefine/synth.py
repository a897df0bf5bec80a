"""Procedural high-resolution segmentation scenes and a small dense base model (for experiments, benchmark, notebook).

Scenes (seeded NumPy + Pillow): Voronoi regions of three "stuff" classes (ground / wall / foliage), thin lines of
class "pole" (1-2 px wide at 256 px, scaled with the image) and small discs of class "sign" (radius 2-5 px at
256 px). Each class has its own colour and sinusoidal texture; the image gets a lighting gradient and Gaussian
noise. Thin lines and small discs vanish at 1/4 resolution, which is what sparse refinement should recover.

`DenseSegNet`: a small fully convolutional encoder-decoder (3x3 convs at 1, 1/2, 1/4 resolution, nearest
upsampling, a full-resolution skip, 1x1 classifier), used as the low-res base model and as the dense high-res
baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from jaxeff.sparserefine.data import require_normalised

CLASSES = ("ground", "wall", "foliage", "pole", "sign")
THIN, SMALL = 3, 4
_COLOURS = np.array([(128, 64, 128), (90, 90, 90), (107, 142, 35), (150, 150, 170), (220, 200, 0)], np.float32)
_PERIODS = (9.0, 4.0, 6.0, 3.0, 5.0)  # texture period (px at 256) per class


def make_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image uint8 [h, w, 3], label uint8 [h, w] (class ids into `CLASSES`)."""
    s = min(h, w) / 256.0
    n_seeds = int(rng.integers(5, 10))
    seeds = rng.uniform(0, 1, (n_seeds, 2)) * (h, w)
    seed_cls = rng.integers(0, 3, n_seeds)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    best, label = np.full((h, w), np.inf, np.float32), np.zeros((h, w), np.uint8)
    for (sy, sx), c in zip(seeds, seed_cls):
        d = (yy - sy) ** 2 + (xx - sx) ** 2
        closer = d < best
        best[closer], label[closer] = d[closer], c
    canvas = Image.fromarray(label)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 9))):  # poles / wires: long thin lines
        p0, p1 = rng.uniform(0, 1, 2) * (w, h), rng.uniform(0, 1, 2) * (w, h)
        draw.line([tuple(p0), tuple(p1)], fill=THIN, width=max(1, int(round(rng.uniform(1, 2.4) * s))))
    for _ in range(int(rng.integers(6, 14))):  # signs: small discs
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(2, 5) * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=SMALL)
    label = np.asarray(canvas)
    angle = rng.uniform(0, np.pi, len(CLASSES))
    tex = np.zeros((h, w), np.float32)
    for c in range(len(CLASSES)):
        phase = (np.cos(angle[c]) * xx + np.sin(angle[c]) * yy) * (2 * np.pi / (_PERIODS[c] * s))
        tex = np.where(label == c, np.sin(phase) * 18, tex)
    light = 0.8 + 0.4 * (rng.uniform() * yy / h + rng.uniform() * xx / w) / 2
    image = _COLOURS[label] * light[..., None] + tex[..., None] + rng.normal(0, 10, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_scenes(n: int, h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n scenes: images uint8 [n, h, w, 3], labels uint8 [n, h, w]."""
    rng = np.random.default_rng(seed)
    pairs = [make_scene(rng, h, w) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def downsample(images, factor: int):
    """Area (box) average by an integer factor: float [..., H, W, C] -> [..., H/f, W/f, C]."""
    *lead, h, w, c = images.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the factor {factor}")
    x = images.reshape(*lead, h // factor, factor, w // factor, factor, c)
    return x.mean(axis=(-4, -2))


class DenseSegNet(nnx.Module):
    """images float [B, H, W, 3] (H, W multiples of 4; `normalize_image`d in the experiments, integer dtypes raise
    ValueError) -> logits [B, H, W, num_classes]."""

    def __init__(self, num_classes: int, width: int = 16, *, rngs: nnx.Rngs):
        c = width
        conv = lambda a, b, s=1: nnx.Conv(a, b, (3, 3), strides=s, padding="SAME", rngs=rngs)  # noqa: E731
        self.stem, self.full = conv(3, c), conv(c, c)
        self.down1, self.mid1 = conv(c, 2 * c, 2), conv(2 * c, 2 * c)
        self.down2, self.mid2 = conv(2 * c, 4 * c, 2), conv(4 * c, 4 * c)
        self.fuse = conv(c + 2 * c + 4 * c, c)
        self.head = nnx.Conv(c, num_classes, (1, 1), rngs=rngs)

    def __call__(self, x):
        require_normalised(x, "DenseSegNet")
        relu = jax.nn.relu
        f1 = relu(self.full(relu(self.stem(x))))
        f2 = relu(self.mid1(relu(self.down1(f1))))
        f4 = relu(self.mid2(relu(self.down2(f2))))
        up = lambda t, f: jnp.repeat(jnp.repeat(t, f, axis=1), f, axis=2)  # noqa: E731
        return self.head(relu(self.fuse(jnp.concatenate([f1, up(f2, 2), up(f4, 4)], -1))))


def confusion(pred, label, num_classes: int, ignore: int = 255) -> np.ndarray:
    """int64 [K, K] confusion matrix (rows: label, cols: prediction), `ignore` labels skipped."""
    pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
    keep = label != ignore
    return np.bincount(label[keep].astype(np.int64) * num_classes + pred[keep], minlength=num_classes ** 2
                       ).reshape(num_classes, num_classes)


def iou(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU from a confusion matrix (NaN for a class absent from labels and predictions)."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)
