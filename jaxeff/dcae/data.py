"""Offline images for the DC-AE experiments (scikit-image / scikit-learn samples); metrics are in `metrics`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxeff.dcae.metrics import quantize_uint8

# RGB sample images that ship inside the scikit-image and scikit-learn wheels (no download).
SKIMAGE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field")
SKLEARN_IMAGES = ("china", "flower")
ALL_IMAGES = SKIMAGE_IMAGES + SKLEARN_IMAGES
TEST_IMAGES = ("coffee", "chelsea")
TRAIN_IMAGES = tuple(n for n in ALL_IMAGES if n not in TEST_IMAGES)


def load_image(name: str) -> np.ndarray:
    """uint8 [H, W, 3]."""
    if name in SKLEARN_IMAGES:
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    if name not in SKIMAGE_IMAGES:
        raise ValueError(f"unknown image {name!r}; known: {ALL_IMAGES}")
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())[..., :3]


def to_signed(img: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 in [-1, 1]; other dtypes raise a ValueError (a float image may already be in
    [-1, 1])."""
    if np.asarray(img).dtype != np.uint8:
        raise ValueError(f"to_signed expects uint8 images in [0, 255], got {np.asarray(img).dtype}")
    return img.astype(np.float32) / 127.5 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8 numpy array, quantized as the official evaluator does (`metrics.quantize_uint8`)."""
    return np.asarray(quantize_uint8(jnp.asarray(x)))


def resize_to(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Anti-aliased resize of a whole uint8 image to (H, W)."""
    from skimage.transform import resize

    return to_uint8(resize(to_signed(img), size, anti_aliasing=True, preserve_range=True))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Square center crop (after shrinking so the short side equals `size`)."""
    h, w = img.shape[:2]
    if min(h, w) != size:
        scale = size / min(h, w)
        h, w = max(size, round(h * scale)), max(size, round(w * scale))
        img = resize_to(img, (h, w))
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def crop_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    h, w = (img.shape[0] // multiple) * multiple, (img.shape[1] // multiple) * multiple
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[top : top + h, left : left + w]


class CropSampler:
    """Random square crops (with random horizontal flips) from a list of images, as float32 in [-1, 1]."""

    def __init__(self, images: list[np.ndarray], size: int, seed: int):
        small = [im for im in images if min(im.shape[:2]) < size]
        if small:
            raise ValueError(f"crop size {size} is larger than an image of shape {small[0].shape}")
        self.images = [to_signed(im) for im in images]
        self.size = size
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> np.ndarray:
        out = np.empty((batch, self.size, self.size, 3), np.float32)
        for i in range(batch):
            im = self.images[self.rng.integers(len(self.images))]
            top = self.rng.integers(im.shape[0] - self.size + 1)
            left = self.rng.integers(im.shape[1] - self.size + 1)
            crop = im[top : top + self.size, left : left + self.size]
            out[i] = crop[:, ::-1] if self.rng.random() < 0.5 else crop
        return out
