"""The matched diffusion baseline for HART's speed comparisons: a DiT-style latent diffusion transformer.

Same width / depth / heads as the HART transformer, text as in-context tokens (like HART), adaLN-zero from the
timestep + pooled text embedding, GELU MLP (ratio 4), patch size 2 on an SD-style f8 latent (128x128x4 at 1024px ->
4096 image tokens). Sampling: `steps` deterministic DDIM steps on the cosine schedule with classifier-free guidance
(batch doubled). Random weights only: it exists to be timed and counted, not to make pictures. `dtype` /
`param_dtype` as HART's (float32 LayerNorms, residual stream and sampler); attention through `jaxeff.nn.attention`,
like HART's, with the same `kernel_default` choice, so both sides of a comparison get the same kernels. CPU-tested only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.hart.diffusion import cosine_betas, timestep_embedding
from jaxeff.nn.attention import attention, kernel_default


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    hidden: int = 1536
    depth: int = 16
    num_heads: int = 24
    mlp_ratio: float = 4.0
    patch: int = 2
    in_channels: int = 4
    latent_size: int = 128  # 1024px with an f8 autoencoder
    context_token: int = 300
    context_dim: int = 1536

    @property
    def num_patches(self) -> int:
        return (self.latent_size // self.patch) ** 2


class DiTBlock(nnx.Module):
    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs, **dt):
        c = cfg.hidden
        self.h = cfg.num_heads
        self.norm1 = nnx.LayerNorm(c, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
        self.qkv = nnx.Linear(c, 3 * c, rngs=rngs, **dt)
        self.proj = nnx.Linear(c, c, rngs=rngs, **dt)
        self.norm2 = nnx.LayerNorm(c, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
        self.fc1 = nnx.Linear(c, int(c * cfg.mlp_ratio), rngs=rngs, **dt)
        self.fc2 = nnx.Linear(int(c * cfg.mlp_ratio), c, rngs=rngs, **dt)
        self.ada = nnx.Linear(c, 6 * c, rngs=rngs, **dt)

    def __call__(self, x, c, implementation=None):
        b, n, d = x.shape
        s1, b1, g1, s2, b2, g2 = jnp.split(self.ada(jax.nn.silu(c))[:, None], 6, -1)
        qkv = self.qkv(self.norm1(x) * (1 + s1) + b1).reshape(b, n, 3, self.h, d // self.h)
        if implementation is None:  # the fused kernel where HART's cached attention gets one too (kernel_default)
            implementation = kernel_default(n, n, d // self.h, causal=False, dtype=qkv.dtype)
        a = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=False, implementation=implementation)
        x = x + g1 * self.proj(a.reshape(b, n, d))
        return x + g2 * self.fc2(jax.nn.gelu(self.fc1(self.norm2(x) * (1 + s2) + b2)))


class DiT(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c, p = cfg.hidden, cfg.patch
        dt = {"dtype": dtype, "param_dtype": param_dtype}
        self.cfg = cfg
        self.x_embed = nnx.Linear(p * p * cfg.in_channels, c, rngs=rngs, **dt)
        self.t_fc1 = nnx.Linear(256, c, rngs=rngs, **dt)
        self.t_fc2 = nnx.Linear(c, c, rngs=rngs, **dt)
        self.context_embed = nnx.Linear(cfg.context_dim, c, rngs=rngs, **dt)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, cfg.num_patches, c)) * 0.02)
        self.blocks = nnx.List([DiTBlock(cfg, rngs, **dt) for _ in range(cfg.depth)])
        self.final_norm = nnx.LayerNorm(c, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
        self.final_ada = nnx.Linear(c, 2 * c, rngs=rngs, **dt)
        self.final = nnx.Linear(c, p * p * cfg.in_channels, rngs=rngs, **dt)

    def __call__(self, x, t, context, implementation=None):
        """x [B, S, S, Cin] latent, t [B] timesteps, context [B, T, Dctx] -> predicted noise like x (float32)."""
        cfg = self.cfg
        b, s, _, cin = x.shape
        p, g = cfg.patch, s // cfg.patch
        tok = x.reshape(b, g, p, g, p, cin).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * cin)
        ctx = self.context_embed(context).astype(jnp.float32)
        c = self.t_fc2(jax.nn.silu(self.t_fc1(timestep_embedding(t, 256)))) + jnp.max(ctx, 1)
        h = jnp.concatenate([ctx, self.x_embed(tok) + self.pos[...]], 1)
        for blk in self.blocks:
            h = blk(h, c, implementation)
        sh, sc = jnp.split(self.final_ada(jax.nn.silu(c))[:, None], 2, -1)
        out = self.final(self.final_norm(h[:, ctx.shape[1]:]) * (1 + sc) + sh).astype(jnp.float32)
        return out.reshape(b, g, g, p, p, cin).transpose(0, 1, 3, 2, 4, 5).reshape(b, s, s, cin)


def ddim_sample(model: DiT, context, key, steps: int = 20, cfg_scale: float = 4.5, implementation=None):
    """Deterministic DDIM over `steps` evenly spaced timesteps of the 1000-step cosine schedule, with CFG."""
    c = model.cfg
    ac = np.cumprod(1 - cosine_betas(1000))
    ts = np.linspace(999, 0, steps).round().astype(int)
    b = context.shape[0]
    x = jax.random.normal(key, (b, c.latent_size, c.latent_size, c.in_channels))
    ctx2 = jnp.concatenate([context, jnp.zeros_like(context)], 0)
    for i, t in enumerate(ts):
        eps2 = model(jnp.concatenate([x, x], 0), jnp.full((2 * b,), t), ctx2, implementation)
        eps = (1 + cfg_scale) * eps2[:b] - cfg_scale * eps2[b:]
        a_t = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < steps else 1.0
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "implementation"))
def ddim_sample_jit(graphdef, state, context, key, steps: int = 20, cfg_scale: float = 4.5, implementation=None):
    return ddim_sample(nnx.merge(graphdef, state), context, key, steps, cfg_scale, implementation)
