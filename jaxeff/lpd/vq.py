"""LlamaGen VQ-f16 tokenizer (`vq_ds16_c2i`; mit-han-lab/lpd `models/vqgan.py`), NHWC.

Encoder -> quant_conv -> l2-normalised nearest code (both the encoder output and the codebook are l2-normalised,
`codebook_l2_norm=True`) -> post_quant_conv -> decoder. The encoder / decoder are the shared VQGAN trunk
(`jaxeff.nn.vqgan`: GroupNorm(32), separate q/k/v attention at the lowest resolution and in the middle), whose module
paths equal LlamaGen's keys (`encoder.conv_blocks.1.res.0.conv1`, `decoder.mid.1.q`), so
`jaxeff.lpd.weights.load_into` maps the state dict by name.

Images are [B, H, W, 3] float32 in [-1, 1]; indices [B, H/f, W/f] int32 (row-major = LPD raster tokens;
`decode_code` also takes them flat, [B, N]).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff import checks
from jaxeff.lpd import _checks
from jaxeff.nn import vqgan


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Defaults are the released `vq_ds16_c2i` (16384 codes of dim 8, factor 16)."""

    codebook_size: int = 16384
    codebook_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2  # the decoder uses num_res_blocks + 1 per level, as the official code
    norm_groups: int = 32

    def __post_init__(self):
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} is not divisible by norm_groups={self.norm_groups}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _trunk(cfg: VQConfig) -> dict:
    return dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
                groups=cfg.norm_groups)


def _l2_normalize(x):
    """torch F.normalize(x, dim=-1, eps=1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Quantizer(nnx.Module):
    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.uniform(2.0 / cfg.codebook_size)
        self.embedding = nnx.Embed(cfg.codebook_size, cfg.codebook_dim, embedding_init=init, rngs=rngs)

    def codebook(self):
        """[K, dim] l2-normalised codebook."""
        return _l2_normalize(self.embedding.embedding[...])

    def __call__(self, h):
        """h [..., dim] -> (indices [...] int32, z_q [..., dim]): nearest normalised code to the normalised h."""
        z, e = _l2_normalize(h), self.codebook()
        dist = jnp.sum(z**2, -1, keepdims=True) + jnp.sum(e**2, -1) - 2 * jnp.einsum("...d,kd->...k", z, e)
        idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)
        return idx, jnp.take(e, idx, axis=0)


class VQModel(nnx.Module):
    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = vqgan.Encoder(**_trunk(cfg), rngs=rngs)
        self.decoder = vqgan.Decoder(**_trunk(cfg), rngs=rngs)
        self.quantize = Quantizer(cfg, rngs=rngs)
        self.quant_conv = vqgan.conv(cfg.z_channels, cfg.codebook_dim, 1, rngs)
        self.post_quant_conv = vqgan.conv(cfg.codebook_dim, cfg.z_channels, 1, rngs)

    def encode(self, image):
        """image [B, H, W, 3] float in [-1, 1], H and W multiples of f -> (indices [B, H/f, W/f] int32,
        z_q [B, H/f, W/f, dim], pre-quant h). Raises TypeError for a non-float (e.g. uint8) image, ValueError for
        another layout (e.g. NCHW) and, when the values are concrete, for a max above 10 (0..255 values in a float
        array); values outside [-1, 1] below that (a decoded image, a resize) are encoded as they are."""
        f = self.config.factor
        if not jnp.issubdtype(checks.dtype_of(image), jnp.floating):
            raise TypeError(f"images must be float in [-1, 1] (uint8: x / 127.5 - 1), got dtype "
                            f"{checks.dtype_of(image)}")
        shape = np.shape(image)
        if len(shape) != 4 or shape[-1] != 3 or shape[1] % f or shape[2] % f:
            raise ValueError(f"images must be [B, H, W, 3] (NHWC) with H, W multiples of {f}, got shape {shape}")
        # Only the 0..255 mistake is caught (a max above 10: any such image with a pixel brighter than 10/255):
        # decoded images overshoot [-1, 1] (to 3.3 on the tiny random VQ of tests/test_lpd.py) and so do
        # resizes; the official encoder checks nothing. Only host (numpy) images are read: a device array would be
        # copied to the host on every call, and a tracer's max cannot be read.
        top = float(np.max(image)) if isinstance(image, np.ndarray) and image.size else None
        if top is not None and top > 10:
            raise ValueError(f"images must be float in [-1, 1] (uint8: x / 127.5 - 1), got a max of {top:.4g}")
        h = self.quant_conv(self.encoder(image))
        idx, zq = self.quantize(h)
        return idx, zq, h

    def decode(self, zq):
        """z_q [B, h, w, dim] float -> image [B, 16h, 16w, 3] (for f = 16). ValueError for another shape or
        integer input (code ids go to `decode_code`)."""
        shape, dim = np.shape(zq), self.config.codebook_dim
        if len(shape) != 4 or shape[-1] != dim or not jnp.issubdtype(checks.dtype_of(zq), jnp.floating):
            raise ValueError(f"decode takes float code vectors [B, h, w, {dim}], got {checks.dtype_of(zq)} {shape}; "
                             "code ids go to decode_code")
        return self.decoder(self.post_quant_conv(zq))

    def decode_code(self, indices):
        """Code ids -> image [B, f*h, f*w, 3] in [-1, 1]: normalised codebook rows, then `decode`.

        indices: int [B, h, w], or flat [B, N] raster tokens (what `jaxeff.lpd.generate` returns) with N a square
        (h = w = sqrt(N)). Raises TypeError for non-integer ids, ValueError for other shapes and, when the ids are
        concrete (numpy, or jax arrays outside a trace), for ids outside [0, codebook_size), naming the first. Under
        `jax.jit` the ids cannot be inspected: an id outside the range then decodes to NaN pixels (never a wrapped
        or clamped code)."""
        k = self.config.codebook_size
        checks.require_int_array(indices, "VQ code ids")
        shape = np.shape(indices)
        if len(shape) == 2:
            side = math.isqrt(shape[1])
            if side * side != shape[1]:
                raise ValueError(f"flat code ids [B, N] need a square N (h = w); got {shape}: pass [B, h, w]")
            indices = jnp.reshape(jnp.asarray(indices), (shape[0], side, side))
        elif len(shape) != 3:
            raise ValueError(f"code ids must be [B, h, w] (or flat [B, h*w] with h = w), got shape {shape}")
        _checks.check_range(indices, k, "VQ code ids")
        return self.decode(jnp.take(self.quantize.codebook(), _checks.guard(indices, k), axis=0))


def load_vq(path, config: VQConfig | None = None, *, weights_only: bool = True) -> VQModel:
    """LlamaGen VQ from `vq_ds16_c2i.pt` (torch pickle, `ckpt["model"]` or bare) or safetensors; the default
    config is the released tokenizer's. `quantize.codebook_used` (a usage counter) is ignored."""
    from jaxeff.lpd.weights import load_into, read_state_dict

    if config is not None and not isinstance(config, VQConfig):
        raise TypeError(f"config must be a VQConfig or None, got {type(config).__name__} {config!r}")
    cfg = config or VQConfig()
    tensors = read_state_dict(path, weights_only=weights_only)
    model = nnx.eval_shape(lambda: VQModel(cfg, rngs=nnx.Rngs(0)))
    return load_into(model, tensors, source=str(path))


def to_uint8(image) -> jnp.ndarray:
    """[-1, 1] float image -> uint8, round(clip((x + 1) / 2 * 255, 0, 255)) as `engine.evaluate` saves it."""
    return jnp.round(jnp.clip((image + 1) / 2 * 255, 0, 255)).astype(jnp.uint8)
