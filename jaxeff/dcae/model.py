"""DC-AE (Deep Compression Autoencoder, arXiv 2410.10733) in Flax NNX, NHWC.

Module and parameter names mirror diffusers' `AutoencoderDC` (`encoder.down_blocks.3.0.attn.to_q.weight`), so a
diffusers state dict maps onto this model by name, with torch layouts transposed (conv OIHW -> HWIO, linear
(out, in) -> (in, out)). Parity with diffusers 0.42.1 in float32 on CPU (tests/test_dcae.py). On CPU,
wide 3x3 convs on large maps run as Winograd F(4x4, 3x3) and depthwise convs as shifted sums, which XLA:CPU runs
faster than its native convolutions; other backends get XLA's convolutions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.data import require_float
from jaxeff.dcae import weights
from jaxeff.dcae.config import DCAEConfig, get_config
from jaxeff.io import hub
from jaxeff.nn import depthwise_conv, glu_mbconv, relu_linear_attention
from pallas_kernels import channel_rms_norm

_ACTS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": jax.nn.relu, "silu": jax.nn.silu, "relu6": jax.nn.relu6}


def pixel_unshuffle(x: jax.Array, factor: int = 2) -> jax.Array:
    """[B, H, W, C] -> [B, H/f, W/f, C*f*f], channel order c*f*f + i*f + j as torch.nn.functional.pixel_unshuffle."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c * factor * factor)


def pixel_shuffle(x: jax.Array, factor: int = 2) -> jax.Array:
    """Inverse of `pixel_unshuffle`: [B, H, W, C*f*f] -> [B, H*f, W*f, C]."""
    b, h, w, c = x.shape
    c_out = c // (factor * factor)
    x = x.reshape(b, h, w, c_out, factor, factor)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * factor, w * factor, c_out)


# Winograd F(4x4, 3x3) (Lavin & Gray, arXiv 1509.09308): a 6x6 input tile gives a 4x4 output tile.
_WINO_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                     [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
_WINO_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                    [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_WINO_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)


def _lincomb(terms: list[jax.Array], coefs) -> jax.Array:
    """sum(c * t) over the nonzero constant coefficients, unrolled so XLA fuses it into one elementwise loop."""
    out = None
    for t, c in zip(terms, coefs):
        if c:
            t = t if c == 1 else (-t if c == -1 else t * float(c))
            out = t if out is None else out + t
    return out


def winograd_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """'Same' 3x3 stride-1 conv [B, H, W, C] x [3, 3, C, O] (HWIO) -> [B, H, W, O] as Winograd F(4x4, 3x3).

    36 matmuls [B*H*W/16, C] @ [C, O] replace the 9 [B*H*W, C] @ [C, O] of a direct conv (4x fewer multiplies),
    at the price of elementwise tile transforms and a per-call filter transform. Float32 relative error ~5e-6
    (direct conv ~1e-7). H and W need not be multiples of 4 (padded, then cropped). Run on CPU."""
    b, h, wd, _ = x.shape
    m, a = _WINO_AT.shape
    th, tw = -(-h // m), -(-wd // m)
    xp = jnp.pad(x, ((0, 0), (1, th * m - h + 1), (1, tw * m - wd + 1), (0, 0)))
    taps = [w[i, j] for i in range(3) for j in range(3)]
    rows = [xp[:, i : i + m * th : m] for i in range(a)]  # row i of every input tile: [B, th, W + 2, C]
    prods = []
    for p in range(a):
        rp = _lincomb(rows, _WINO_BT[p])
        cols = [rp[:, :, j : j + m * tw : m] for j in range(a)]  # [B, th, tw, C]
        # 36 separate dots, not one batched einsum: that copied all tiles into one stacked operand (1.2x slower)
        prods.append([_lincomb(cols, _WINO_BT[q]) @ _lincomb(taps, np.outer(_WINO_G[p], _WINO_G[q]).ravel())
                      for q in range(a)])
    half = [[_lincomb([prods[p][q] for p in range(a)], _WINO_AT[r]) for q in range(a)] for r in range(m)]
    out = [jnp.stack([_lincomb(half[r], _WINO_AT[s]) for s in range(m)], axis=3) for r in range(m)]
    y = jnp.stack(out, axis=2)  # [B, th, m, tw, m, O]
    return y.reshape(b, th * m, tw * m, -1)[:, :h, :wd]


def _winograd_pays(x: jax.Array, w: jax.Array) -> bool:
    # Measured on XLA:CPU (2-core AVX-512 EPYC, float32): 1.5-2x faster than the native conv (and than torch's
    # oneDNN) on >= 128x128 maps with >= 256 channels in and out; no gain at 128 output channels (and a loss when a
    # pixel-unshuffle follows), a loss on small maps (the filter transform is redone every call) and on thin convs.
    # GPU/TPU convolution libraries pick their own algorithms.
    pixels = x.shape[0] * x.shape[1] * x.shape[2]
    return jax.default_backend() == "cpu" and x.dtype == jnp.float32 and pixels >= 128 * 128 and min(w.shape[2:]) >= 256


def _bound(fan_in: int) -> float:
    # torch's default init for conv/linear weights and biases: kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
    return 1.0 / np.sqrt(fan_in)


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    return jax.random.uniform(rngs.params(), shape, dtype, -_bound(fan_in), _bound(fan_in))


class Conv2d(nnx.Module):
    """Conv with torch semantics (symmetric padding k//2, groups); weight stored HWIO."""

    def __init__(self, cin: int, cout: int, kernel_size: int, *, stride: int = 1, groups: int = 1, bias: bool = True,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        fan_in = cin // groups * kernel_size * kernel_size
        self.weight = nnx.Param(_uniform(rngs, (kernel_size, kernel_size, cin // groups, cout), fan_in, dtype))
        self.bias = nnx.Param(_uniform(rngs, (cout,), fan_in, dtype)) if bias else None
        self.stride, self.groups, self.kernel_size = stride, groups, kernel_size

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        if self.kernel_size == 1 and self.stride == 1:
            # 1x1 convs as matmuls: XLA:CPU runs these faster than its grouped-conv path. groups=1 stays a plain
            # 2-D matmul: a size-1 group batch axis made XLA:CPU transpose activations around the dot
            g = self.groups
            if g == 1:
                y = x @ w[0, 0]
            else:
                cin_g, cout = w.shape[2], w.shape[3]
                wg = w[0, 0].reshape(cin_g, g, cout // g).transpose(1, 0, 2)
                xg = x.reshape(*x.shape[:-1], g, cin_g)
                y = jnp.einsum("...gi,gio->...go", xg, wg).reshape(*x.shape[:-1], cout)
        elif self.groups == w.shape[3] and w.shape[2] == 1 and self.stride == 1:
            y = depthwise_conv(x, w)  # shifted sum on CPU, the native grouped conv on GPU/TPU
        elif self.kernel_size == 3 and self.stride == 1 and self.groups == 1 and _winograd_pays(x, w):
            y = winograd_conv3x3(x, w)
        else:
            p = self.kernel_size // 2
            y = jax.lax.conv_general_dilated(
                x, w, (self.stride, self.stride), ((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
            )
        return y if self.bias is None else y + self.bias[...]


class Linear(nnx.Module):
    """Bias-free linear layer on the channel axis; weight stored (in, out)."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.weight = nnx.Param(_uniform(rngs, (cin, cout), cin, dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.weight[...]


class RMSNorm2d(nnx.Module):
    """RMS norm over channels at each pixel with weight and bias (the original `trms2d`), computed in float32."""

    def __init__(self, channels: int, eps: float = 1e-5, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array, residual: jax.Array | None = None) -> jax.Array:
        """`residual + norm(x)`: one fused Pallas kernel on GPU/TPU, XLA elsewhere (pallas_kernels.channel_norm)."""
        return channel_rms_norm(x, self.weight[...], self.bias[...], residual, eps=self.eps)


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d (the decoders' `bn2d`; eps 1e-5, momentum 0.1, the defaults the official `build_norm`
    and diffusers use) over the channels of [B, H, W, C].

    Eval mode (`use_running_average=True`, the default, `model.eval()`): normalizes with the running statistics.
    Training mode (`model.train()`): normalizes with the batch mean and biased variance over (B, H, W) in float32 and
    updates the running statistics in place, `running = (1 - momentum) * running + momentum * batch`, with the
    unbiased batch variance, as torch does; inside jit the caller carries the new `nnx.BatchStat` state out (see
    `training.make_step`). The batch mean is a plain `jnp.mean` over the batch: under jit with a batch-sharded
    input that is the global batch (as torch's SyncBatchNorm; not run on several devices here), inside shard_map
    each shard's. torch's `num_batches_tracked` is unused at a fixed momentum. Parity with torch in both modes is
    tested on CPU (tests/test_dcae.py)."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype))
        self.running_mean = nnx.BatchStat(jnp.zeros((channels,), dtype))
        self.running_var = nnx.BatchStat(jnp.ones((channels,), dtype))
        self.eps, self.momentum = eps, momentum
        self.use_running_average = True

    def __call__(self, x: jax.Array, residual: jax.Array | None = None) -> jax.Array:
        if self.use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            n = x.shape[0] * x.shape[1] * x.shape[2]
            if n < 2:
                raise ValueError(f"BatchNorm2d in training mode needs more than one value per channel, got {x.shape}")
            m = self.momentum
            self.running_mean[...] = ((1 - m) * self.running_mean[...] + m * mean).astype(self.running_mean.dtype)
            self.running_var[...] = ((1 - m) * self.running_var[...] + m * var * (n / (n - 1))).astype(
                self.running_var.dtype)
        scale = self.weight[...] * jax.lax.rsqrt(var + self.eps)
        y = ((x - mean) * scale + self.bias[...]).astype(x.dtype)
        return y if residual is None else residual + y


def make_norm(norm_type: str, channels: int, dtype) -> RMSNorm2d | BatchNorm2d:
    return RMSNorm2d(channels, dtype=dtype) if norm_type == "rms_norm" else BatchNorm2d(channels, dtype=dtype)


class ResBlock(nnx.Module):
    """x + norm(conv3x3(act(conv3x3(x))))."""

    def __init__(self, channels: int, norm_type: str, act_fn: str, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv1 = Conv2d(channels, channels, 3, rngs=rngs, dtype=dtype)
        self.conv2 = Conv2d(channels, channels, 3, bias=False, rngs=rngs, dtype=dtype)
        self.norm = make_norm(norm_type, channels, dtype)
        self.act = act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv2(_ACTS[self.act](self.conv1(x))), residual=x)


class MultiscaleProjection(nnx.Module):
    """Multi-scale token aggregation: depthwise kxk conv, then a 1x1 conv grouped by 3*heads."""

    def __init__(self, channels: int, heads: int, kernel_size: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.proj_in = Conv2d(channels, channels, kernel_size, groups=channels, bias=False, rngs=rngs, dtype=dtype)
        self.proj_out = Conv2d(channels, channels, 1, groups=3 * heads, bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(self.proj_in(x))


class LiteMLA(nnx.Module):
    """Multi-scale ReLU linear attention (diffusers `SanaMultiscaleLinearAttention`), with the residual.

    `to_q`/`to_k`/`to_v` are the thirds of the original fused qkv conv; the heads read their q, k and v from the
    concatenation in a head-interleaved layout ([q_h, k_h, v_h] per 3*head_dim channels), as the original does.
    Maps with H*W <= head_dim use quadratic ReLU attention (its normalisation in float32, as the official
    `relu_quadratic_att`), larger ones linear attention (`jaxeff.nn.relu_linear_attention`, shared with SANA) with
    the official per-dtype precision (bfloat16 matmuls for bfloat16 activations), or all in float32 as diffusers
    with `fp32_attention=True`."""

    def __init__(self, channels: int, head_dim: int, norm_type: str, kernel_sizes: tuple[int, ...], *,
                 rngs: nnx.Rngs, dtype=jnp.float32, eps: float = 1e-15, fp32_attention: bool = False):
        heads = channels // head_dim
        inner = heads * head_dim
        self.to_q = Linear(channels, inner, rngs=rngs, dtype=dtype)
        self.to_k = Linear(channels, inner, rngs=rngs, dtype=dtype)
        self.to_v = Linear(channels, inner, rngs=rngs, dtype=dtype)
        self.to_qkv_multiscale = nnx.List(
            [MultiscaleProjection(3 * inner, heads, k, rngs=rngs, dtype=dtype) for k in kernel_sizes]
        )
        self.to_out = Linear(inner * (1 + len(kernel_sizes)), channels, rngs=rngs, dtype=dtype)
        self.norm_out = make_norm(norm_type, channels, dtype)
        self.head_dim, self.eps = head_dim, eps
        self.precision = "float32" if fp32_attention else "efficientvit"

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        wqkv = jnp.concatenate([self.to_q.weight[...], self.to_k.weight[...], self.to_v.weight[...]], axis=1)
        qkv = x @ wqkv
        qkv = jnp.concatenate([qkv] + [proj(qkv) for proj in self.to_qkv_multiscale], axis=-1)
        d = self.head_dim
        qkv = qkv.reshape(b, h * w, -1, 3, d)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        if h * w > d:
            out = relu_linear_attention(q, k, v, self.eps, precision=self.precision)
        else:
            q, k = jax.nn.relu(q), jax.nn.relu(k)
            scores = jnp.einsum("bmhd,bnhd->bhmn", k, q).astype(jnp.float32)
            scores = scores / (scores.sum(axis=2, keepdims=True) + self.eps)
            out = jnp.einsum("bmhe,bhmn->bnhe", v, scores.astype(v.dtype))
        out = out.reshape(b, h, w, -1).astype(x.dtype)
        return self.norm_out(self.to_out(out), residual=x)


class GLUMBConv(nnx.Module):
    """x + rms(conv1x1(a * silu(gate))), [a, gate] = dwconv3x3(silu(conv1x1(x))), expansion 4; the core without
    the residual and norm is `jaxeff.nn.glu_mbconv` (shared with SANA)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32, expand_ratio: int = 4):
        hidden = expand_ratio * channels
        self.conv_inverted = Conv2d(channels, 2 * hidden, 1, rngs=rngs, dtype=dtype)
        self.conv_depth = Conv2d(2 * hidden, 2 * hidden, 3, groups=2 * hidden, rngs=rngs, dtype=dtype)
        self.conv_point = Conv2d(hidden, channels, 1, bias=False, rngs=rngs, dtype=dtype)
        self.norm = RMSNorm2d(channels, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        inv, depth = self.conv_inverted, self.conv_depth
        y = glu_mbconv(x, inv.weight[...], inv.bias[...], depth.weight[...], depth.bias[...],
                       self.conv_point.weight[...])
        return self.norm(y, residual=x)


class EfficientViTBlock(nnx.Module):
    def __init__(self, channels: int, head_dim: int, norm_type: str, kernel_sizes: tuple[int, ...], *,
                 rngs: nnx.Rngs, dtype=jnp.float32, fp32_attention: bool = False):
        self.attn = LiteMLA(channels, head_dim, norm_type, kernel_sizes, rngs=rngs, dtype=dtype,
                            fp32_attention=fp32_attention)
        self.conv_out = GLUMBConv(channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv_out(self.attn(x))


class DownBlock(nnx.Module):
    """x2 down-sampling: conv + pixel-unshuffle (or stride-2 conv), plus the residual-autoencoding shortcut
    (space-to-channel, then average channel groups down to the output width)."""

    def __init__(self, cin: int, cout: int, *, pixel_unshuffle: bool, shortcut: bool, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.unshuffle = pixel_unshuffle
        self.conv = Conv2d(cin, cout // 4 if pixel_unshuffle else cout, 3, stride=1 if pixel_unshuffle else 2,
                           rngs=rngs, dtype=dtype)
        self.group_size = 4 * cin // cout if shortcut else 0

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)
        if self.unshuffle:
            y = pixel_unshuffle(y)
        if self.group_size:
            s = pixel_unshuffle(x)
            y = y + s.reshape(*s.shape[:-1], -1, self.group_size).mean(axis=-1)
        return y


class UpBlock(nnx.Module):
    """x2 up-sampling: conv + pixel-shuffle (or nearest x2 + conv), plus the residual-autoencoding shortcut
    (duplicate channels, then channel-to-space)."""

    def __init__(self, cin: int, cout: int, *, interpolate: bool, shortcut: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        self.interpolate = interpolate
        self.conv = Conv2d(cin, cout if interpolate else 4 * cout, 3, rngs=rngs, dtype=dtype)
        self.repeats = 4 * cout // cin if shortcut else 0

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.interpolate:
            y = self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        else:
            y = pixel_shuffle(self.conv(x))
        if self.repeats:
            y = y + pixel_shuffle(jnp.repeat(x, self.repeats, axis=-1))
        return y


def _make_block(block_type: str, channels: int, cfg: DCAEConfig, norm: str, act: str, scales: tuple[int, ...],
                rngs: nnx.Rngs, dtype, fp32_attention: bool):
    if block_type == "ResBlock":
        return ResBlock(channels, norm, act, rngs=rngs, dtype=dtype)
    return EfficientViTBlock(channels, cfg.attention_head_dim, norm, scales, rngs=rngs, dtype=dtype,
                             fp32_attention=fp32_attention)


class Encoder(nnx.Module):
    def __init__(self, cfg: DCAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, fp32_attention: bool = False):
        widths, depths = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        if depths[0] > 0:
            self.conv_in = Conv2d(cfg.in_channels, widths[0], 3, rngs=rngs, dtype=dtype)
        else:
            self.conv_in = DownBlock(cfg.in_channels, widths[1], pixel_unshuffle=unshuffle, shortcut=False,
                                     rngs=rngs, dtype=dtype)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [
                _make_block(cfg.encoder_block_types[i], width, cfg, "rms_norm", "silu", cfg.encoder_qkv_multiscales[i],
                            rngs, dtype, fp32_attention)
                for _ in range(depth)
            ]
            if i < len(widths) - 1 and depth > 0:
                blocks.append(DownBlock(width, widths[i + 1], pixel_unshuffle=unshuffle,
                                        shortcut=cfg.downsample_shortcut, rngs=rngs, dtype=dtype))
            stages.append(nnx.List(blocks))
        self.down_blocks = nnx.List(stages)
        self.conv_out = Conv2d(widths[-1], cfg.latent_channels, 3, rngs=rngs, dtype=dtype)
        self.out_group = widths[-1] // cfg.latent_channels if cfg.encoder_out_shortcut else 0

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            for block in stage:
                x = block(x)
        y = self.conv_out(x)
        if self.out_group:
            y = y + x.reshape(*x.shape[:-1], -1, self.out_group).mean(axis=-1)
        return y


class Decoder(nnx.Module):
    def __init__(self, cfg: DCAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, fp32_attention: bool = False):
        widths, depths = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        interpolate = cfg.upsample_block_type == "interpolate"
        self.conv_in = Conv2d(cfg.latent_channels, widths[-1], 3, rngs=rngs, dtype=dtype)
        self.in_repeats = widths[-1] // cfg.latent_channels if cfg.decoder_in_shortcut else 0
        stages = []
        for i in reversed(range(len(widths))):
            blocks = []
            if i < len(widths) - 1 and depths[i] > 0:
                blocks.append(UpBlock(widths[i + 1], widths[i], interpolate=interpolate,
                                      shortcut=cfg.upsample_shortcut, rngs=rngs, dtype=dtype))
            blocks += [
                _make_block(cfg.decoder_block_types[i], widths[i], cfg, cfg.decoder_norm_types[i],
                            cfg.decoder_act_fns[i], cfg.decoder_qkv_multiscales[i], rngs, dtype, fp32_attention)
                for _ in range(depths[i])
            ]
            stages.insert(0, nnx.List(blocks))
        self.up_blocks = nnx.List(stages)
        channels = widths[0] if depths[0] > 0 else widths[1]
        self.norm_out = RMSNorm2d(channels, dtype=dtype)
        self.act = cfg.decoder_conv_act_fn
        if depths[0] > 0:
            self.conv_out = Conv2d(channels, cfg.in_channels, 3, rngs=rngs, dtype=dtype)
        else:
            self.conv_out = UpBlock(channels, cfg.in_channels, interpolate=interpolate, shortcut=False,
                                    rngs=rngs, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        if self.in_repeats:
            x = x + jnp.repeat(z, self.in_repeats, axis=-1)
        for stage in reversed(self.up_blocks):
            for block in stage:
                x = block(x)
        return self.conv_out(_ACTS[self.act](self.norm_out(x)))


class DCAE(nnx.Module):
    """DC-AE: `encode` [B, H, W, 3] float images in [-1, 1] to [B, H/f, W/f, c] latents, `decode` back.

    Images are float (any float dtype) in [-1, 1], as the official code and diffusers take them; integer images
    (uint8 [0, 255]) raise a ValueError saying to convert with x / 127.5 - 1 (`jaxeff.dcae.data.to_signed`),
    latents must be float too. A float image in another range (e.g. [0, 1]) cannot be told apart by dtype and
    gives a wrong latent.

    `scaled=True` multiplies latents by `config.scaling_factor` (the diffusion-model latent) on encode and divides
    on decode. Parameters are float32 unless `dtype` says otherwise; norms run in float32. The linear attention
    follows the official precision rule (efficientvit `LiteMLA.relu_linear_att`): with bfloat16 parameters its two
    matmuls run in bfloat16 and the division in float32; `fp32_attention=True` runs it all in float32, as diffusers'
    `AutoencoderDC` does (identical for float32 parameters).
    Wrap calls in `jax.jit` (see `jit_method`) for speed; eager calls work but dispatch op by op."""

    def __init__(self, config: DCAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, fp32_attention: bool = False):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype, fp32_attention=fp32_attention)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype, fp32_attention=fp32_attention)

    @property
    def dtype(self):
        return self.encoder.conv_out.weight[...].dtype

    def encode(self, images: jax.Array, *, scaled: bool = False) -> jax.Array:
        f = self.config.spatial_compression
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise ValueError(f"encode expects [B, H, W, {self.config.in_channels}] images, got shape {images.shape}")
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image size {images.shape[1:3]} must be a multiple of the compression factor {f}")
        require_float(images, "DCAE.encode")
        z = self.encoder(images.astype(self.dtype))
        return z * self.config.scaling_factor if scaled else z

    def decode(self, latents: jax.Array, *, scaled: bool = False) -> jax.Array:
        c = self.config.latent_channels
        if latents.ndim != 4 or latents.shape[-1] != c:
            raise ValueError(f"decode expects [B, h, w, {c}] latents, got shape {latents.shape}")
        require_float(latents, "DCAE.decode", "float latents (from encode)", "latents.astype(float32)")
        z = latents.astype(self.dtype)
        return self.decoder(z / self.config.scaling_factor if scaled else z)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images))

    @classmethod
    def random(cls, config: DCAEConfig, seed: int = 0, *, dtype=jnp.float32, fp32_attention: bool = False) -> DCAE:
        """Same init distribution as the constructor, drawn with numpy: constructing with `nnx.Rngs` compiles one
        XLA RNG program per parameter shape, which takes minutes on a busy CPU for the full-size models."""
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, fp32_attention=fp32_attention))
        rng = np.random.default_rng(seed)
        for _, m in nnx.iter_modules(model):
            if isinstance(m, Conv2d | Linear):
                bound = _bound(int(np.prod(m.weight.shape[:-1])))  # HWIO / (in, out): all but the output axis
                for var in (m.weight, getattr(m, "bias", None)):
                    if var is not None:
                        var.set_value(jnp.asarray(rng.uniform(-bound, bound, var.shape), dtype))
            elif isinstance(m, RMSNorm2d | BatchNorm2d):
                for var in vars(m).values():
                    if isinstance(var, nnx.Variable):
                        fill = np.ones if var is m.weight or var is getattr(m, "running_var", None) else np.zeros
                        var.set_value(jnp.asarray(fill(var.shape), dtype))
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, *, config: DCAEConfig | str | None = None, dtype=jnp.float32,
                        fp32_attention: bool = False) -> DCAE:
        """Load released weights: a diffusers directory (`config.json` + `diffusion_pytorch_model.safetensors`),
        an original-format directory or file (`model.safetensors`), or a single diffusers-format file with
        `config=`. Original-format weights carry no architecture: it comes from `config=` (a `DCAEConfig` or a
        released name such as "dc-ae-f32c32-in-1.0"), else the `model_name` in a `config.json` beside the file,
        else the directory name (for `hf:<owner>/<repo>`, downloaded by `jaxeff.io.hub.resolve`: the repo name).
        Missing, unexpected or mis-shaped tensors raise a ValueError naming them; so does an unknown config name,
        before any file is read. `dtype` and `fp32_attention` as in the constructor."""
        if isinstance(config, str):
            config = get_config(config)
        if hub.is_hub_name(path):
            repo = hub.parse(path)[0].split("/")[1]
            path = hub.resolve(path, allow_patterns=["*.json", "*.safetensors"])
            if config is None and not (path / "config.json").exists():
                config = repo  # the snapshot folder is a commit hash, not the model name
        cfg, tensors = weights.read_checkpoint(path, config)
        model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), dtype=dtype, fp32_attention=fp32_attention))
        weights.load_torch_state(model, tensors, dtype=dtype, source=str(path))
        return model


def jit_method(model: nnx.Module, method: str, **kwargs) -> Callable:
    """`model.<method>(*args, **kwargs)` compiled with jax.jit, the model split into graph and state outside."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

    return functools.partial(fn, state)
