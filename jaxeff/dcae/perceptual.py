"""LPIPS (Zhang et al. 2018) with the AlexNet or VGG16 backbone, as torchmetrics' `_LPIPS` computes it, from a
local weights file.

The DC-AE evaluator reports LPIPS-AlexNet (torchmetrics' default); LPIPS-VGG16 is the usual perceptual training
loss. Nothing is downloaded. The file is one safetensors file holding the torchvision backbone's
`features.<i>.weight/bias` (torchvision indices) and the LPIPS heads `lin<k>.model.1.weight` ([1, C, 1, 1]); the
layout of a saved `lpips.LPIPS(net=...)` or torchmetrics `_LPIPS(net=...)` state dict (`net.slice<s>.<i>.weight`)
is read as well. To make one where torchvision and the network are available:

    from torchmetrics.functional.image.lpips import _LPIPS           # heads ship in the torchmetrics wheel
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in _LPIPS(net="alex").state_dict().items()}, "lpips_alex.safetensors")

The AlexNet / VGG16 ImageNet backbones come from torchvision's download server, so they are not available
offline. Feature normalization is torchmetrics' `x / sqrt(sum x^2 + 1e-8)` (the lpips package uses
`x / (sqrt(sum x^2) + 1e-10)`; the two differ only for near-zero feature vectors). Parity with torchmetrics 1.9
(random backbones, the released heads) is tested on CPU; nothing else was run.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.data import require_float
from jaxeff.io.safetensors import load_file

# Per backbone: the five LPIPS taps, each a sequence of ("pool", kernel, stride) / ("conv", features index, stride,
# padding) ops ending in a ReLU output (torchvision `features` indices; LPIPS slices 1..5).
_NETS = {
    "alex": (
        (("conv", 0, 4, 2),),
        (("pool", 3, 2), ("conv", 3, 1, 2)),
        (("pool", 3, 2), ("conv", 6, 1, 1)),
        (("conv", 8, 1, 1),),
        (("conv", 10, 1, 1),),
    ),
    "vgg": (
        (("conv", 0, 1, 1), ("conv", 2, 1, 1)),
        (("pool", 2, 2), ("conv", 5, 1, 1), ("conv", 7, 1, 1)),
        (("pool", 2, 2), ("conv", 10, 1, 1), ("conv", 12, 1, 1), ("conv", 14, 1, 1)),
        (("pool", 2, 2), ("conv", 17, 1, 1), ("conv", 19, 1, 1), ("conv", 21, 1, 1)),
        (("pool", 2, 2), ("conv", 24, 1, 1), ("conv", 26, 1, 1), ("conv", 28, 1, 1)),
    ),
}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def _conv_indices(net: str) -> list[int]:
    return [op[1] for stage in _NETS[net] for op in stage if op[0] == "conv"]


def load_lpips_weights(path: str | Path, net: str = "alex") -> dict[str, np.ndarray]:
    """Read and check an LPIPS weights file for backbone `net` ("alex" | "vgg"); conv weights come back HWIO
    float32, heads as [C]. The dict is a pytree: pass it to jitted functions as an argument."""
    if net not in _NETS:
        raise ValueError(f"unknown LPIPS backbone {net!r}; known: {sorted(_NETS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LPIPS weights file {path} not found")
    tensors = {re.sub(r"^net\.slice\d+\.(\d+)\.", r"features.\1.", k): v for k, v in load_file(path).items()}
    want = [f"features.{i}.{p}" for i in _conv_indices(net) for p in ("weight", "bias")]
    want += [f"lin{k}.model.1.weight" for k in range(len(_NETS[net]))]
    missing = [k for k in want if k not in tensors]
    if missing:
        raise ValueError(f"{path}: not an LPIPS-{net} weights file; missing {missing[:8]}")
    out = {}
    for k in want:
        v = np.asarray(tensors[k], np.float32)
        out[k] = v.transpose(2, 3, 1, 0) if v.ndim == 4 and k.startswith("features") else v.reshape(-1)
    got = tuple(out[f"lin{k}.model.1.weight"].size for k in range(len(_NETS[net])))
    if got != CHANNELS[net]:
        raise ValueError(f"{path}: LPIPS head widths {got} are not those of {net} {CHANNELS[net]}")
    return out


def _backbone(weights: dict[str, np.ndarray]) -> str:
    # the first conv tells the backbones apart: AlexNet 11x11, VGG16 3x3
    return "alex" if weights["features.0.weight"].shape[0] == 11 else "vgg"


def lpips(weights: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image LPIPS distance of [B, H, W, 3] images in [-1, 1] -> [B] float32 (weights from
    `load_lpips_weights`; the backbone is read off them). Integer images raise a ValueError."""
    require_float(x, "lpips")
    require_float(y, "lpips")
    h = (jnp.concatenate([x, y]).astype(jnp.float32) - _SHIFT) / _SCALE
    total = 0.0
    for k, stage in enumerate(_NETS[_backbone(weights)]):
        for op in stage:
            if op[0] == "pool":  # torch MaxPool2d(kernel, stride), no padding, floor mode
                _, size, stride = op
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1),
                                          "VALID")
            else:
                _, i, stride, pad = op
                h = jax.lax.conv_general_dilated(h, weights[f"features.{i}.weight"], (stride, stride),
                                                 ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
                h = jax.nn.relu(h + weights[f"features.{i}.bias"])
        f = h * jax.lax.rsqrt(jnp.sum(h * h, axis=-1, keepdims=True) + 1e-8)
        fx, fy = jnp.split(f, 2)
        total = total + jnp.mean(jnp.sum((fx - fy) ** 2 * weights[f"lin{k}.model.1.weight"], axis=-1), axis=(1, 2))
    return total
