"""LlamaGen VQ-f16 tokenizer (`vq_ds16_c2i`; mit-han-lab/lpd `models/vqgan.py`), NHWC.

Encoder -> quant_conv -> l2-normalised nearest code (both the encoder output and the codebook are l2-normalised,
`codebook_l2_norm=True`) -> post_quant_conv -> decoder. GroupNorm(32, eps 1e-6) everywhere, swish, attention only at
the lowest resolution and in the mid blocks, downsample = right/bottom zero pad + stride-2 3x3 conv, upsample =
nearest x2 + 3x3 conv. Module paths equal the official keys (`encoder.conv_blocks.1.res.0.conv1`, `decoder.mid.1.q`),
so `jaxeff.lpd.weights.load_into` maps the state dict by name. Decoder `conv_blocks.0` is the lowest resolution.

Images are [B, H, W, 3] float32 in [-1, 1]; indices [B, H/f, W/f] int32 (row-major = LPD raster tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


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


def _conv(cin, cout, k, rngs, stride=1, padding=None):
    pad = ((k // 2, k // 2), (k // 2, k // 2)) if padding is None else padding
    return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=pad, rngs=rngs)


def _norm(c, groups, rngs):
    return nnx.GroupNorm(c, num_groups=groups, epsilon=1e-6, use_fast_variance=False, rngs=rngs)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, groups: int = 32, *, rngs: nnx.Rngs):
        self.norm1 = _norm(cin, groups, rngs)
        self.conv1 = _conv(cin, cout, 3, rngs)
        self.norm2 = _norm(cout, groups, rngs)
        self.conv2 = _conv(cout, cout, 3, rngs)
        self.nin_shortcut = _conv(cin, cout, 1, rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nnx.Module):
    """Single-head spatial self-attention with separate 1x1 q, k, v convs (LlamaGen layout)."""

    def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs):
        self.norm = _norm(c, groups, rngs)
        self.q, self.k, self.v = (_conv(c, c, 1, rngs) for _ in range(3))
        self.proj_out = _conv(c, c, 1, rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (f(y).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
        attn = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * c**-0.5, axis=-1)
        return x + self.proj_out(jnp.einsum("bij,bjc->bic", attn, v).reshape(b, h, w, c))


class Downsample(nnx.Module):
    def __init__(self, c: int, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, rngs, stride=2, padding="VALID")

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    def __init__(self, c: int, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class ConvBlock(nnx.Module):
    """One resolution level: resnet blocks (`res`), attention after each (`attn`, possibly empty), resampler."""

    def __init__(self, res, attn, downsample=None, upsample=None):
        self.res = nnx.List(res)
        self.attn = nnx.List(attn)
        self.downsample = downsample
        self.upsample = upsample

    def __call__(self, h):
        for i, blk in enumerate(self.res):
            h = blk(h)
            if len(self.attn):
                h = self.attn[i](h)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                h = resample(h)
        return h


def _mid(c, groups, rngs):
    return nnx.List([ResnetBlock(c, c, groups, rngs=rngs), AttnBlock(c, groups, rngs=rngs),
                     ResnetBlock(c, c, groups, rngs=rngs)])


class Encoder(nnx.Module):
    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = _conv(3, cfg.ch, 3, rngs)
        in_mult = (1,) + tuple(cfg.ch_mult)
        blocks = []
        for i in range(n):
            cin, cout = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            res, attn = [], []
            for _ in range(cfg.num_res_blocks):
                res.append(ResnetBlock(cin, cout, g, rngs=rngs))
                cin = cout
                if i == n - 1:
                    attn.append(AttnBlock(cin, g, rngs=rngs))
            blocks.append(ConvBlock(res, attn, downsample=Downsample(cin, rngs) if i != n - 1 else None))
        self.conv_blocks = nnx.List(blocks)
        self.mid = _mid(cin, g, rngs)
        self.norm_out = _norm(cin, g, rngs)
        self.conv_out = _conv(cin, cfg.z_channels, 3, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _conv(cfg.z_channels, cin, 3, rngs)
        self.mid = _mid(cin, g, rngs)
        blocks = []
        for i in reversed(range(n)):  # conv_blocks[0] is the lowest resolution
            cout = cfg.ch * cfg.ch_mult[i]
            res, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(cin, cout, g, rngs=rngs))
                cin = cout
                if i == n - 1:
                    attn.append(AttnBlock(cin, g, rngs=rngs))
            blocks.append(ConvBlock(res, attn, upsample=Upsample(cin, rngs) if i != 0 else None))
        self.conv_blocks = nnx.List(blocks)
        self.norm_out = _norm(cin, g, rngs)
        self.conv_out = _conv(cin, 3, 3, rngs)

    def __call__(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


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
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.quantize = Quantizer(cfg, rngs=rngs)
        self.quant_conv = _conv(cfg.z_channels, cfg.codebook_dim, 1, rngs)
        self.post_quant_conv = _conv(cfg.codebook_dim, cfg.z_channels, 1, rngs)

    def encode(self, image):
        """image [B, H, W, 3] -> (indices [B, H/f, W/f] int32, z_q [B, H/f, W/f, dim], pre-quant h)."""
        h = self.quant_conv(self.encoder(image))
        idx, zq = self.quantize(h)
        return idx, zq, h

    def decode(self, zq):
        """z_q [B, h, w, dim] -> image [B, 16h, 16w, 3] (for f = 16)."""
        return self.decoder(self.post_quant_conv(zq))

    def decode_code(self, indices):
        """indices [B, h, w] int -> image: normalised codebook rows, then `decode`."""
        return self.decode(jnp.take(self.quantize.codebook(), jnp.asarray(indices, jnp.int32), axis=0))


def load_vq(path, config: VQConfig | None = None, *, weights_only: bool = True) -> VQModel:
    """LlamaGen VQ from `vq_ds16_c2i.pt` (torch pickle, `ckpt["model"]` or bare) or safetensors; the default
    config is the released tokenizer's. `quantize.codebook_used` (a usage counter) is ignored."""
    from jaxeff.lpd.weights import load_into, read_state_dict

    cfg = config or VQConfig()
    tensors = read_state_dict(path, weights_only=weights_only)
    model = nnx.eval_shape(lambda: VQModel(cfg, rngs=nnx.Rngs(0)))
    return load_into(model, tensors, source=str(path))


def to_uint8(image) -> jnp.ndarray:
    """[-1, 1] float image -> uint8, round(clip((x + 1) / 2 * 255, 0, 255)) as `engine.evaluate` saves it."""
    return jnp.round(jnp.clip((image + 1) / 2 * 255, 0, 255)).astype(jnp.uint8)
