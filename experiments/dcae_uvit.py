"""Latent-diffusion cost with DC-AE latents: a UViT backbone at 512x512 on SD-VAE-f8 latents (patch 2) vs DC-AE
f32c32 and f64c128 latents (patch 1).

Reports tokens, FLOPs from the lowered program's `cost_analysis()`, and measured forward / train-step times with
their speed-up over f8, side by side in one run. The paper (arXiv 2410.10733) reports 19.1x faster inference and
17.9x faster training for UViT-H (501M) with f64 vs SD-VAE-f8 on an H100. `smoke` uses a narrow UViT with the real
token counts (CPU); `full` is UViT-H (width 1152, depth 28, 16 heads) for a GPU/TPU. Ran on CPU only so far.

Multi-process: every process measures the same programs on its own first device (a per-device cost, nothing
sharded), and process 0 writes the run directory. Run on: 1 CPU device.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.experiment import Run, register

# (name, latent channels, spatial compression, patch size)
AUTOENCODERS = (("SD-VAE-f8c4 p2", 4, 8, 2), ("DC-AE-f32c32 p1", 32, 32, 1), ("DC-AE-f64c128 p1", 128, 64, 1))


@dataclasses.dataclass(frozen=True)
class Config:
    resolution: int = 512
    width: int = 1152
    depth: int = 28  # in-blocks + out-blocks (UViT); one more mid block
    heads: int = 16
    batch: int = 8
    repeats: int = 5
    dtype: str = "bfloat16"

    def validate(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.depth % 2:
            raise ValueError(f"depth {self.depth} must be even (UViT pairs in- and out-blocks)")
        if self.resolution % 64:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 64")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("dtype must be float32 or bfloat16")


class Block(nnx.Module):
    """Pre-norm transformer block; out-blocks first fuse their long skip (concat + linear), as UViT does."""

    def __init__(self, width: int, heads: int, *, skip: bool, rngs: nnx.Rngs, dtype):
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": dtype}
        self.skip = nnx.Linear(2 * width, width, **kw) if skip else None
        self.norm1, self.norm2 = nnx.LayerNorm(width, **kw), nnx.LayerNorm(width, **kw)
        self.qkv, self.proj = nnx.Linear(width, 3 * width, **kw), nnx.Linear(width, width, **kw)
        self.fc1, self.fc2 = nnx.Linear(width, 4 * width, **kw), nnx.Linear(4 * width, width, **kw)
        self.heads = heads

    def __call__(self, x, skip=None):
        if self.skip is not None:
            x = self.skip(jnp.concatenate([x, skip], axis=-1))
        b, n, w = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, n, 3 * self.heads, w // self.heads), 3, axis=2)
        x = x + self.proj(jax.nn.dot_product_attention(q, k, v).reshape(b, n, w))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class UViT(nnx.Module):
    """U-ViT (Bao et al. 2023): patch tokens + a time token, long skips between in- and out-blocks."""

    def __init__(self, latent_hw: int, latent_c: int, patch: int, width: int, depth: int, heads: int, *,
                 rngs: nnx.Rngs, dtype):
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": dtype}
        self.patch, self.latent_c = patch, latent_c
        self.patch_embed = nnx.Conv(latent_c, width, (patch, patch), strides=patch, padding="VALID", **kw)
        self.time_mlp1, self.time_mlp2 = nnx.Linear(width, 4 * width, **kw), nnx.Linear(4 * width, width, **kw)
        n_tokens = 1 + (latent_hw // patch) ** 2
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n_tokens, width), dtype))
        self.in_blocks = nnx.List([Block(width, heads, skip=False, rngs=rngs, dtype=dtype) for _ in range(depth // 2)])
        self.mid = Block(width, heads, skip=False, rngs=rngs, dtype=dtype)
        self.out_blocks = nnx.List([Block(width, heads, skip=True, rngs=rngs, dtype=dtype) for _ in range(depth // 2)])
        self.norm = nnx.LayerNorm(width, **kw)
        self.head = nnx.Linear(width, patch * patch * latent_c, **kw)
        self.final = nnx.Conv(latent_c, latent_c, (3, 3), **kw)
        self.width = width

    def __call__(self, z, t):
        b, h, w, _ = z.shape
        p = self.patch
        x = self.patch_embed(z).reshape(b, -1, self.width)
        half = self.width // 2
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / half)
        temb = jnp.concatenate([jnp.cos(t[:, None] * freqs), jnp.sin(t[:, None] * freqs)], axis=-1).astype(x.dtype)
        temb = self.time_mlp2(jax.nn.silu(self.time_mlp1(temb)))
        x = jnp.concatenate([temb[:, None], x], axis=1) + self.pos[...]
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.head(self.norm(x))[:, 1:]
        x = x.reshape(b, h // p, w // p, p, p, self.latent_c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)
        return self.final(x)


def _flops(lowered) -> float:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def _time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(cfg: Config, latent_c: int, factor: int, patch: int) -> dict:
    dtype = jnp.dtype(cfg.dtype)
    hw = cfg.resolution // factor
    model = UViT(hw, latent_c, patch, cfg.width, cfg.depth, cfg.heads,
                 rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), dtype=dtype)
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((cfg.batch, hw, hw, latent_c)), dtype)
    t = jnp.asarray(rng.uniform(0, 1000, cfg.batch), jnp.float32)

    def forward(params, z, t):
        return nnx.merge(graphdef, params)(z, t)

    def train_step(params, opt_state, z, t):
        noise = jax.random.normal(jax.random.key(1), z.shape, z.dtype)
        alpha = jnp.cos(t / 1000 * jnp.pi / 2)[:, None, None, None].astype(z.dtype)
        noisy = alpha * z + jnp.sqrt(1 - alpha**2) * noise

        def loss_fn(params):
            return jnp.mean((forward(params, noisy, t).astype(jnp.float32) - noise.astype(jnp.float32)) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # FLOPs from the lowered programs: the compiled GPU program hides its cuBLAS/cuDNN calls from cost_analysis().
    fwd_lowered = jax.jit(forward).lower(params, z, t)
    step_lowered = jax.jit(train_step).lower(params, opt_state, z, t)
    fwd, step = fwd_lowered.compile(), step_lowered.compile()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {
        "tokens": (hw // patch) ** 2,
        "params_M": n_params / 1e6,
        "fwd_GFLOPs": _flops(fwd_lowered) / 1e9,
        "train_GFLOPs": _flops(step_lowered) / 1e9,
        "fwd_ms": 1e3 * _time(fwd, (params, z, t), cfg.repeats),
        "train_ms": 1e3 * _time(step, (params, opt_state, z, t), cfg.repeats),
    }


@register("dcae_uvit", Config, presets={
    "smoke": {"width": 192, "depth": 4, "heads": 4, "batch": 2, "repeats": 3, "dtype": "float32"},
    "full": {},
})
def run(cfg: Config, run: Run) -> None:
    """UViT at 512px on SD-VAE-f8 vs DC-AE f32/f64 latents: tokens, FLOPs, forward/train time ratios."""
    import matplotlib.pyplot as plt

    results = {}
    for name, c, f, p in run.progress(AUTOENCODERS, desc="autoencoders"):
        results[name] = measure(cfg, c, f, p)
        run.log(len(results), autoencoder=name, **results[name])
    base = results[AUTOENCODERS[0][0]]
    rows = []
    for name, r in results.items():
        rows.append({
            "latent": name, "tokens": r["tokens"], "params (M)": r["params_M"],
            "fwd GFLOPs": r["fwd_GFLOPs"], "GMACs/image": r["fwd_GFLOPs"] / 2 / cfg.batch,
            "FLOPs ratio": base["fwd_GFLOPs"] / r["fwd_GFLOPs"],
            "fwd ms": r["fwd_ms"], "fwd speed-up": base["fwd_ms"] / r["fwd_ms"],
            "train-step ms": r["train_ms"], "train speed-up": base["train_ms"] / r["train_ms"],
        })
    device = jax.devices()[0].device_kind
    run.results(
        rows,
        title=f"UViT width {cfg.width}, depth {cfg.depth}+1, {cfg.heads} heads, batch {cfg.batch}, "
              f"{cfg.resolution}px, {cfg.dtype}, on {jax.default_backend()} ({device})",
        note=("Paper (UViT-H, H100): 19.1x inference / 17.9x training speed-up of DC-AE-f64 over SD-VAE-f8; README "
              "GMACs 133.25 (f32) vs 33.25 (f64) per image. FLOPs are per batch, from the lowered program's XLA "
              "cost_analysis(); times are medians "
              f"of {cfg.repeats} runs after warm-up."),
    )
    run.save_json("results.json", results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(rows))
    for i, key in enumerate(("FLOPs ratio", "fwd speed-up", "train speed-up")):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in rows], 0.27, label=key)
    ax.set_xticks(x, [r["latent"] for r in rows])
    ax.set_ylabel("x over SD-VAE-f8 p2")
    ax.set_yscale("log")
    ax.legend()
    run.savefig(fig, "speedup.png")
