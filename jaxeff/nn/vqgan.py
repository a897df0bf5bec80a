"""The taming-transformers / VQGAN convolutional autoencoder trunk (NHWC), shared by the LlamaGen VQ-f16 (LPD) and
the VAR-style HART tokenizer.

GroupNorm(eps 1e-6, two-pass variance as torch) everywhere, swish, single-head spatial attention at the lowest
resolution and in the middle, downsample = right/bottom zero pad + stride-2 3x3 conv, upsample = nearest x2 + 3x3
conv. Module paths follow LlamaGen's keys (`encoder.conv_blocks.1.res.0.conv1`, `decoder.mid.1.q`; decoder
`conv_blocks.0` is the lowest resolution); a system whose official checkpoint names them differently (VAR's
`down.N.block.M`, `mid.block_1`) renames in its loader. Activations are [B, H, W, C].

Precision (the flax convention): `dtype` is the compute dtype of every conv, the attention matmuls and the
activations between them (what the blocks return); `param_dtype` is the conv weights'. The GroupNorm statistics
and normalisation run in float32 whatever `dtype` is (flax's GroupNorm promotes to float32, then casts its output
to `dtype`) and keep float32 scale / bias; the attention logits accumulate in float32 and the softmax runs in
float32. This is what torch autocast does to the official VQGAN code (convs and bmm in half precision, group_norm
and softmax in float32). Default float32: the parity tests' mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, stride: int = 1, padding=None, dtype=jnp.float32,
         param_dtype=jnp.float32) -> nnx.Conv:
    """k x k conv, 'same' padding unless given; inputs are cast to `dtype`, weights stored in `param_dtype`."""
    pad = ((k // 2, k // 2), (k // 2, k // 2)) if padding is None else padding
    return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=pad, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


def group_norm(c: int, groups: int, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.GroupNorm:
    """GroupNorm(eps 1e-6, two-pass variance); statistics in float32, float32 scale / bias, output in `dtype`."""
    return nnx.GroupNorm(c, num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, groups: int = 32, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        cv = functools.partial(conv, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = group_norm(cin, groups, rngs, dtype)
        self.conv1 = cv(cin, cout, 3)
        self.norm2 = group_norm(cout, groups, rngs, dtype)
        self.conv2 = cv(cout, cout, 3)
        self.nin_shortcut = cv(cin, cout, 1) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nnx.Module):
    """Single-head spatial self-attention: separate 1x1 `q`, `k`, `v` convs (LlamaGen) or one fused `qkv` conv (VAR,
    `fused_qkv=True`)."""

    def __init__(self, c: int, groups: int, *, fused_qkv: bool = False, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        cv = functools.partial(conv, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fused_qkv = fused_qkv
        self.norm = group_norm(c, groups, rngs, dtype)
        if fused_qkv:
            self.qkv = cv(c, 3 * c, 1)
        else:
            self.q, self.k, self.v = (cv(c, c, 1) for _ in range(3))
        self.proj_out = cv(c, c, 1)

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.norm(x)
        if self.fused_qkv:
            q, k, v = jnp.split(self.qkv(y).reshape(b, h * w, 3 * c), 3, axis=-1)
        else:
            q, k, v = (f(y).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * c**-0.5
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # float32 statistics, probabilities in `dtype`
        return x + self.proj_out(jnp.einsum("bij,bjc->bic", attn, v).reshape(b, h, w, c))


class Downsample(nnx.Module):
    def __init__(self, c: int, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.conv = conv(c, c, 3, rngs, stride=2, padding="VALID", dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))  # asymmetric pad, as in the VQGAN code


class Upsample(nnx.Module):
    def __init__(self, c: int, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.conv = conv(c, c, 3, rngs, dtype=dtype, param_dtype=param_dtype)

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


def _level(cin, cout, n_res, groups, attn, fused_qkv, rngs, dt):
    """`n_res` resnet blocks cin -> cout, attention after each if `attn`: (res list, attn list). `dt`: the
    dtype / param_dtype keywords."""
    res, attns = [], []
    for _ in range(n_res):
        res.append(ResnetBlock(cin, cout, groups, rngs=rngs, **dt))
        cin = cout
        if attn:
            attns.append(AttnBlock(cout, groups, fused_qkv=fused_qkv, rngs=rngs, **dt))
    return res, attns


def _mid(c, groups, attn, fused_qkv, rngs, dt):
    """ResnetBlock, AttnBlock (if `attn`), ResnetBlock."""
    mods = [ResnetBlock(c, c, groups, rngs=rngs, **dt)]
    if attn:
        mods.append(AttnBlock(c, groups, fused_qkv=fused_qkv, rngs=rngs, **dt))
    return nnx.List(mods + [ResnetBlock(c, c, groups, rngs=rngs, **dt)])


class Encoder(nnx.Module):
    """image [B, H, W, in_channels] -> [B, H/f, W/f, z_channels] in `dtype`, f = 2 ** (len(ch_mult) - 1). `attn`:
    attention after each resnet block of the lowest level; `mid_attn`: attention in the middle; `dtype` /
    `param_dtype`: see the module docstring."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, groups: int,
                 in_channels: int = 3, attn: bool = True, mid_attn: bool = True, fused_qkv: bool = False,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        dt = {"dtype": dtype, "param_dtype": param_dtype}
        n = len(ch_mult)
        self.conv_in = conv(in_channels, ch, 3, rngs, **dt)
        in_mult = (1,) + tuple(ch_mult)
        blocks = []
        for i in range(n):
            c = ch * ch_mult[i]
            res, attns = _level(ch * in_mult[i], c, num_res_blocks, groups, attn and i == n - 1, fused_qkv, rngs, dt)
            blocks.append(ConvBlock(res, attns, downsample=Downsample(c, rngs, **dt) if i != n - 1 else None))
        self.conv_blocks = nnx.List(blocks)
        self.mid = _mid(c, groups, mid_attn, fused_qkv, rngs, dt)
        self.norm_out = group_norm(c, groups, rngs, dtype)
        self.conv_out = conv(c, z_channels, 3, rngs, **dt)

    def __call__(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """[B, h, w, z_channels] -> [B, f h, f w, out_channels] in `dtype` (unclamped); `num_res_blocks + 1` resnet
    blocks per level, as the official code; `conv_blocks[0]` is the lowest resolution; `dtype` / `param_dtype`: see
    the module docstring."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, groups: int,
                 out_channels: int = 3, attn: bool = True, mid_attn: bool = True, fused_qkv: bool = False,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        dt = {"dtype": dtype, "param_dtype": param_dtype}
        n = len(ch_mult)
        c = ch * ch_mult[-1]
        self.conv_in = conv(z_channels, c, 3, rngs, **dt)
        self.mid = _mid(c, groups, mid_attn, fused_qkv, rngs, dt)
        blocks = []
        for i in reversed(range(n)):
            res, attns = _level(c, ch * ch_mult[i], num_res_blocks + 1, groups, attn and i == n - 1, fused_qkv, rngs,
                                dt)
            c = ch * ch_mult[i]
            blocks.append(ConvBlock(res, attns, upsample=Upsample(c, rngs, **dt) if i != 0 else None))
        self.conv_blocks = nnx.List(blocks)
        self.norm_out = group_norm(c, groups, rngs, dtype)
        self.conv_out = conv(c, out_channels, 3, rngs, **dt)

    def __call__(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))
