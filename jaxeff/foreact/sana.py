"""ForeAct's image-edit SANA transformer in Flax NNX (mit-han-lab/foreact `models/sana.py`, a fork of diffusers'
`SanaTransformer2DModel`), NHWC latents.

Official behaviour (sana.py:24-282, 363-380, 541-631):
- adaLN-single: sinusoidal timestep (256 channels, [cos, sin]) -> Linear -> SiLU -> Linear = `embedded_timestep`;
  Linear(SiLU(.)) -> 6*D modulation, added to each block's `scale_shift_table` [6, D].
- Caption: Linear -> GELU(tanh) -> Linear, then RMSNorm (eps 1e-5, affine).
- Block: LN(no affine) + modulation -> ReLU linear self-attention (float32, V padded with a ones row, i.e. a
  normaliser sum_m k_m.q_n + 1e-15, no 1/sqrt(d)) -> gated residual; softmax cross-attention to the caption with a
  (1 - mask) * -10000 bias, un-gated residual; LN + modulation -> GLUMBConv -> gated residual.
- Image edit: target and source latents through the same 1x1 patch embedding, no positional embedding, an optional
  view embedding added to both halves of a view; sequence [targets of every view] ++ [sources of every view]; the
  GLUMBConv runs on each chunk's own 2-D grid; only the target tokens are decoded (modulated LN + Linear).
Parity with the official code on the golden tiny model is tested (tests/test_foreact.py, float32, CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.foreact.config import SanaConfig
from jaxeff.nn import glu_mbconv, relu_linear_attention
from jaxeff.nn.norms import RMSNorm

TIMESTEP_CHANNELS = 256


def timestep_features(t: jax.Array, channels: int = TIMESTEP_CHANNELS) -> jax.Array:
    """[B] timesteps (int or float; cast to float32) -> [B, channels] = [cos(t f), sin(t f)],
    f_k = exp(-ln(10000) k / (channels/2)) (diffusers `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`)."""
    half = channels // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    arg = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _linear(cin: int, cout: int, rngs: nnx.Rngs, *, bias: bool = True, dtype=jnp.float32) -> nnx.Linear:
    return nnx.Linear(cin, cout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class _MLP2(nnx.Module):
    """linear_1 -> activation -> linear_2 (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection`)."""

    def __init__(self, cin: int, hidden: int, act, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.linear_1 = _linear(cin, hidden, rngs, dtype=dtype)
        self.linear_2 = _linear(hidden, hidden, rngs, dtype=dtype)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


class _Emb(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.timestep_embedder = _MLP2(TIMESTEP_CHANNELS, dim, jax.nn.silu, rngs=rngs, dtype=dtype)


class AdaLayerNormSingle(nnx.Module):
    """timestep [B] -> (modulation [B, 6D], embedded timestep [B, D]) (diffusers `AdaLayerNormSingle`)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.emb = _Emb(dim, rngs=rngs, dtype=dtype)
        self.linear = _linear(dim, 6 * dim, rngs, dtype=dtype)

    def __call__(self, t: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        embedded = self.emb.timestep_embedder(timestep_features(t).astype(dtype))
        return self.linear(jax.nn.silu(embedded)), embedded


class LinearSelfAttention(nnx.Module):
    """SANA's ReLU linear attention over all tokens (diffusers `SanaLinearAttnProcessor2_0`):
    out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps), q, k <- relu; float32; no 1/sqrt(d)
    (`jaxeff.nn.relu_linear_attention`, shared with DC-AE's LiteMLA)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        inner = heads * head_dim
        self.to_q = _linear(dim, inner, rngs, bias=False, dtype=dtype)
        self.to_k = _linear(dim, inner, rngs, bias=False, dtype=dtype)
        self.to_v = _linear(dim, inner, rngs, bias=False, dtype=dtype)
        self.to_out = nnx.List([_linear(inner, dim, rngs, dtype=dtype)])
        self.heads, self.eps = heads, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        split = lambda y: y.reshape(b, n, self.heads, -1)
        out = relu_linear_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)), self.eps)
        return self.to_out[0](out.reshape(b, n, -1).astype(x.dtype))


class CrossAttention(nnx.Module):
    """Softmax attention of the image tokens to the caption tokens; the mask enters as the official additive bias
    (1 - mask) * -10000 (a masked key gets exactly zero weight in float32)."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        inner = heads * head_dim
        self.to_q = _linear(dim, inner, rngs, dtype=dtype)
        self.to_k = _linear(dim, inner, rngs, dtype=dtype)
        self.to_v = _linear(dim, inner, rngs, dtype=dtype)
        self.to_out = nnx.List([_linear(inner, dim, rngs, dtype=dtype)])
        self.heads, self.head_dim = heads, head_dim

    def __call__(self, x: jax.Array, context: jax.Array, bias: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, -1)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, -1)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, -1)
        logits = jnp.einsum("bnhd,blhd->bhnl", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
        weights = jax.nn.softmax(logits + bias[:, None, None, :], axis=-1).astype(v.dtype)
        return self.to_out[0](jnp.einsum("bhnl,blhd->bnhd", weights, v).reshape(b, n, -1))


class GLUMBConv(nnx.Module):
    """1x1 conv D->2F, SiLU, depthwise 3x3 (zero padding), value * SiLU(gate), 1x1 conv F->D without bias
    (diffusers `GLUMBConv(residual_connection=False)`, as SANA's feed-forward); input [B, H, W, D]. nnx.Conv
    modules keep the parameter names; the computation is `jaxeff.nn.glu_mbconv` (shared with DC-AE)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.conv_inverted = nnx.Conv(dim, 2 * hidden, (1, 1), **kw)
        self.conv_depth = nnx.Conv(2 * hidden, 2 * hidden, (3, 3), padding=1, feature_group_count=2 * hidden, **kw)
        self.conv_point = nnx.Conv(hidden, dim, (1, 1), use_bias=False, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        inv, depth = self.conv_inverted, self.conv_depth
        return glu_mbconv(x, inv.kernel[...], inv.bias[...], depth.kernel[...], depth.bias[...],
                          self.conv_point.kernel[...])


class SanaBlock(nnx.Module):
    """One SANA transformer block (sana.py:174-282) on a token sequence made of 2-D chunks."""

    def __init__(self, cfg: SanaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d = cfg.inner_dim
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (6, d), dtype) / math.sqrt(d))
        self.attn1 = LinearSelfAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.linear_attn_eps,
                                         rngs=rngs, dtype=dtype)
        self.attn2 = CrossAttention(d, cfg.num_cross_attention_heads, cfg.cross_attention_head_dim, rngs=rngs,
                                    dtype=dtype)
        self.ff = GLUMBConv(d, cfg.ffn_hidden, rngs=rngs, dtype=dtype)
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array, time_mod: jax.Array, context: jax.Array, bias: jax.Array,
                 grids: Sequence[tuple[int, int]]) -> jax.Array:
        b, _, d = x.shape
        mod = self.scale_shift_table[...][None] + time_mod.reshape(b, 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i : i + 1] for i in range(6))
        x = x + gate_msa * self.attn1(_layer_norm(x, self.eps) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(x, context, bias)
        h = _layer_norm(x, self.eps) * (1 + scale_mlp) + shift_mlp
        chunks, start = [], 0
        for gh, gw in grids:  # the feed-forward sees each view's target or source grid on its own
            chunk = h[:, start : start + gh * gw].reshape(b, gh, gw, d)
            chunks.append(self.ff(chunk).reshape(b, gh * gw, d))
            start += gh * gw
        return x + gate_mlp * jnp.concatenate(chunks, axis=1)


class _PatchEmbed(nnx.Module):
    def __init__(self, cin: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.proj = nnx.Conv(cin, dim, (1, 1), dtype=dtype, param_dtype=dtype, rngs=rngs)


class SanaEditTransformer(nnx.Module):
    """ForeAct's `SanaTransformer2DModel` (patch size 1, no positional embedding).

    `model(targets, sources, timestep, caption, caption_mask, view_embeds=None)`:
    - targets, sources: sequences (one entry per view) of [B, h_v, w_v, in_channels] latents (NHWC, already
      multiplied by the VAE scaling factor); target v and source v must have the same shape. No sources (an
      empty sequence) gives diffusers' plain text-to-image `SanaTransformer2DModel`.
    - timestep [B] (int or float; the sampler passes int timesteps, training float ones, as the official code).
    - caption [B, L, caption_channels] text features; caption_mask [B, L] (1 = token, 0 = padding).
    - view_embeds: [V, D] rows added to view v's target and source tokens (ForeAct's multi-view models), or None.
    Returns one [B, h_v, w_v, out_channels] prediction per view (the target tokens only).
    Raises ValueError for mismatched shapes or a wrong number of view embeddings."""

    def __init__(self, config: SanaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d = config.inner_dim
        self.config = config
        self.patch_embed = _PatchEmbed(config.in_channels, d, rngs=rngs, dtype=dtype)
        self.time_embed = AdaLayerNormSingle(d, rngs=rngs, dtype=dtype)
        self.caption_projection = _MLP2(config.caption_channels, d, lambda x: jax.nn.gelu(x, approximate=True),
                                        rngs=rngs, dtype=dtype)
        self.caption_norm = RMSNorm(d, eps=config.caption_norm_eps, param_dtype=dtype)
        self.transformer_blocks = nnx.List([SanaBlock(config, rngs=rngs, dtype=dtype)
                                            for _ in range(config.num_layers)])
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (2, d), dtype) / math.sqrt(d))
        self.proj_out = _linear(d, config.out_channels, rngs, dtype=dtype)

    def _check(self, targets, sources, timestep, caption, caption_mask, view_embeds):
        cfg = self.config
        if not targets or (sources and len(targets) != len(sources)):
            raise ValueError(f"need one source per target view (or none), got {len(targets)} targets, "
                             f"{len(sources)} sources")
        b = targets[0].shape[0]
        for v, (t, s) in enumerate(zip(targets, sources or targets)):
            if t.ndim != 4 or t.shape != s.shape or t.shape[0] != b or t.shape[-1] != cfg.in_channels:
                raise ValueError(f"view {v}: target {t.shape} and source {s.shape} must both be "
                                 f"[{b}, h, w, {cfg.in_channels}] (NHWC)")
        if jnp.shape(timestep) != (b,):
            raise ValueError(f"timestep must be [{b}], got {jnp.shape(timestep)}")
        if (caption.shape[0] != b or caption.shape[-1] != cfg.caption_channels
                or caption_mask.shape != caption.shape[:2]):
            raise ValueError(f"caption {caption.shape} / mask {caption_mask.shape} must be [{b}, L, "
                             f"{cfg.caption_channels}] / [{b}, L]")
        if view_embeds is not None and view_embeds.shape != (len(targets), cfg.inner_dim):
            raise ValueError(f"view_embeds must be [{len(targets)}, {cfg.inner_dim}], got {view_embeds.shape}")

    def __call__(self, targets: Sequence[jax.Array], sources: Sequence[jax.Array], timestep: jax.Array,
                 caption: jax.Array, caption_mask: jax.Array, view_embeds: jax.Array | None = None,
                 *, return_internals: bool = False):
        self._check(targets, sources, timestep, caption, caption_mask, view_embeds)
        b = targets[0].shape[0]
        dtype = self.proj_out.kernel.dtype
        time_mod, embedded = self.time_embed(timestep, dtype)
        context = self.caption_norm(self.caption_projection(caption.astype(dtype)))
        bias = (1.0 - caption_mask.astype(jnp.float32)) * -10000.0

        def embed(views):
            out = []
            for v, lat in enumerate(views):
                tok = self.patch_embed.proj(lat.astype(dtype)).reshape(b, -1, self.config.inner_dim)
                out.append(tok if view_embeds is None else tok + view_embeds[v].astype(dtype))
            return out

        tgt, src = embed(targets), embed(sources)
        grids = [tuple(t.shape[1:3]) for t in targets] * (2 if sources else 1)
        x = jnp.concatenate(tgt + src, axis=1)
        internals = {"time_mod": time_mod, "embedded_timestep": embedded, "caption_tokens": context,
                     "target_tokens_in": tgt, "source_tokens_in": src}
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, time_mod, context, bias, grids)
            internals[f"block{i}_out"] = x
        n_target = sum(h * w for h, w in grids[: len(targets)])
        shift, scale = jnp.split(self.scale_shift_table[...][None] + embedded[:, None], 2, axis=1)
        y = self.proj_out(_layer_norm(x[:, :n_target], self.config.norm_eps) * (1 + scale) + shift)
        outs, start = [], 0
        for h, w in grids[: len(targets)]:
            outs.append(y[:, start : start + h * w].reshape(b, h, w, -1))
            start += h * w
        return (outs, internals) if return_internals else outs


def num_params(model: nnx.Module) -> int:
    """Number of parameters of `model`."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
