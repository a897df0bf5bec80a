"""HART's residual diffusion head: MAR's `SimpleMLPAdaLN` denoiser plus an iDDPM Gaussian diffusion.

The denoiser predicts (epsilon, variance interpolation) for one token at a time, conditioned on the transformer's
hidden state; the variance is learned in the "learned range" parameterisation. Training uses the cosine schedule
with 1000 steps; sampling respaces it to `num_sampling_steps` (8 for the released model) and runs the ancestral
sampler with x0 clipping, as in mit-han-lab/hart `DiffLoss`. CFG follows `forward_with_cfg`: guided epsilon, the
conditional half's variance. Run on CPU only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.hart.chunks import map_chunks

VAE_SCALE = 0.6  # residual targets are divided by this before diffusion (DiffLoss.vae_scale)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    width: int = 1024
    depth: int = 6
    num_sampling_steps: int = 8
    train_steps: int = 1000


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class MLPPair(nnx.Module):
    """Linear -> SiLU -> Linear (keys `mlp.0`, `mlp.2` in the reference)."""

    def __init__(self, din: int, dout: int, rngs: nnx.Rngs, **dt):
        self.fc1 = nnx.Linear(din, dout, rngs=rngs, **dt)
        self.fc2 = nnx.Linear(dout, dout, rngs=rngs, **dt)

    def __call__(self, x):
        return self.fc2(jax.nn.silu(self.fc1(x)))


def _zero_linear(din, dout, rngs, **dt):
    return nnx.Linear(din, dout, kernel_init=nnx.initializers.zeros_init(), rngs=rngs, **dt)


class ResBlock(nnx.Module):
    def __init__(self, w: int, rngs: nnx.Rngs, **dt):
        self.in_ln = nnx.LayerNorm(w, epsilon=1e-6, rngs=rngs)  # float32 statistics and weights
        self.mlp = MLPPair(w, w, rngs, **dt)
        self.ada = _zero_linear(w, 3 * w, rngs, **dt)

    def __call__(self, x, y):
        shift, scale, gate = jnp.split(self.ada(jax.nn.silu(y)), 3, axis=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nnx.Module):
    def __init__(self, w: int, dout: int, rngs: nnx.Rngs, **dt):
        self.norm_final = nnx.LayerNorm(w, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
        self.linear = _zero_linear(w, dout, rngs, **dt)
        self.ada = _zero_linear(w, 2 * w, rngs, **dt)

    def __call__(self, x, y):
        shift, scale = jnp.split(self.ada(jax.nn.silu(y)), 2, axis=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nnx.Module):
    """Denoiser for one token: x [N, Cvae], t [N] (original 0..999 timesteps), c [N, z_channels] -> [N, 2*Cvae]
    float32. `dtype` / `param_dtype`: matmul compute / weight dtype of the linear layers (the LayerNorms, the
    residual stream and the output stay float32)."""

    def __init__(self, in_channels: int, z_channels: int, width: int, depth: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        dt = {"dtype": dtype, "param_dtype": param_dtype}
        self.in_channels = in_channels
        self.time_embed = MLPPair(256, width, rngs, **dt)
        self.cond_embed = nnx.Linear(z_channels, width, rngs=rngs, **dt)
        self.input_proj = nnx.Linear(in_channels, width, rngs=rngs, **dt)
        self.res_blocks = nnx.List([ResBlock(width, rngs, **dt) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * in_channels, rngs, **dt)

    def __call__(self, x, t, c):
        x = self.input_proj(x).astype(jnp.float32)
        y = self.time_embed(timestep_embedding(t, 256)) + self.cond_embed(c)
        for blk in self.res_blocks:
            x = blk(x, y)
        return self.final_layer(x, y).astype(jnp.float32)


def cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """iDDPM respacing with one section: `count` evenly spread original timesteps."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} diffusion steps into {count}")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Constants of one (possibly respaced) diffusion process, float64 numpy like the reference."""

    betas: np.ndarray
    timestep_map: np.ndarray  # respaced index -> original timestep fed to the network

    @classmethod
    def make(cls, train_steps: int = 1000, sampling_steps: int | None = None) -> Schedule:
        base = cosine_betas(train_steps)
        if sampling_steps is None:
            return cls(base, np.arange(train_steps))
        use = space_timesteps(train_steps, sampling_steps)
        ac = np.cumprod(1.0 - base)
        last, betas = 1.0, []
        for i in use:
            betas.append(1 - ac[i] / last)
            last = ac[i]
        return cls(np.array(betas), np.array(use))

    def __post_init__(self):
        b = self.betas
        ac = np.cumprod(1.0 - b)
        acp = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - acp) / (1.0 - ac)
        consts = dict(
            alphas_cumprod=ac,
            sqrt_ac=np.sqrt(ac),
            sqrt_1m_ac=np.sqrt(1.0 - ac),
            sqrt_recip_ac=np.sqrt(1.0 / ac),
            sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1),
            post_log_var=np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(b),
            log_betas=np.log(b),
            coef1=b * np.sqrt(acp) / (1.0 - ac),
            coef2=(1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac),
        )
        for k, v in consts.items():
            object.__setattr__(self, k, v)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def c(self, name: str, t):
        """Gather a float32 constant at integer timesteps t [N] -> [N, 1]."""
        return jnp.asarray(getattr(self, name), jnp.float32)[t][:, None]

    def p_mean_logvar(self, out, x, t):
        """(posterior mean from the clipped x0 prediction, learned-range log variance, clipped x0 prediction)."""
        eps, v = jnp.split(out, 2, axis=-1)
        frac = (v + 1) / 2
        log_var = frac * self.c("log_betas", t) + (1 - frac) * self.c("post_log_var", t)
        x0 = jnp.clip(self.c("sqrt_recip_ac", t) * x - self.c("sqrt_recipm1_ac", t) * eps, -1.0, 1.0)
        return self.c("coef1", t) * x0 + self.c("coef2", t) * x, log_var, x0


def guided_output(net: SimpleMLPAdaLN, x, t, z, z_uncond=None, cfg=0.0):
    """Network output [N, 2*Cvae] for x [N, Cvae] at original timesteps t [N]; with `z_uncond` HART's
    `forward_with_cfg`: epsilon (1 + cfg) * cond - cfg * uncond (not MAR's uncond + cfg * (cond - uncond)), the
    conditional half's variance value."""
    if z_uncond is None:
        return net(x, t, z)
    n, cv = x.shape[0], net.in_channels
    out = net(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), jnp.concatenate([z, z_uncond], 0))
    cond, unc = out[:n], out[n:]
    return jnp.concatenate([(1 + cfg) * cond[:, :cv] - cfg * unc[:, :cv], cond[:, cv:]], -1)


def sample(net: SimpleMLPAdaLN, sched: Schedule, z, key, *, z_uncond=None, cfg=0.0, temperature: float = 1.0,
           scale: float = VAE_SCALE, noise=None, token_chunk: int | None = None):
    """Ancestral sampling of residual tokens [N, Cvae] (already multiplied back by `scale`).

    With `z_uncond`, the network output is `guided_output`'s. `noise`: the initial x_T [N, Cvae] (default drawn
    from `key`; the later steps' noise always comes from `key`). `token_chunk`: denoise at most this many tokens
    at a time (`jaxeff.hart.chunks.map_chunks`; the noise is drawn for all N first, so the result is the same),
    which bounds the head's activation memory (8 steps x depth of [2 x tokens, 3 x width] adaLN outputs) at any
    batch; None: all at once."""
    n, cv = z.shape[0], net.in_channels
    key, k0 = jax.random.split(key)
    x = jax.random.normal(k0, (n, cv), jnp.float32) if noise is None else jnp.asarray(noise, jnp.float32)
    step_noise = []
    for _ in range(sched.num_steps):
        key, kn = jax.random.split(key)
        step_noise.append(jax.random.normal(kn, (n, cv), jnp.float32))

    def denoise(x, z, z_uncond, step_noise):
        for j, i in enumerate(reversed(range(sched.num_steps))):
            t = jnp.full((x.shape[0],), i, jnp.int32)
            t_net = jnp.full((x.shape[0],), int(sched.timestep_map[i]), jnp.int32)
            out = guided_output(net, x, t_net, z, z_uncond, cfg)
            mean, log_var, _ = sched.p_mean_logvar(out, x, t)
            x = mean + (0.0 if i == 0 else 1.0) * jnp.exp(0.5 * log_var) * step_noise[:, j] * temperature
        return x

    unc = z if z_uncond is None else z_uncond  # a placeholder row-aligned with z when there is no guidance
    x = map_chunks(lambda x, z, u, e: denoise(x, z, None if z_uncond is None else u, e),
                   (x, z, unc, jnp.stack(step_noise, 1)), token_chunk)
    return x * scale


def _normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + jnp.exp(lv1 - lv2) + (m1 - m2) ** 2 * jnp.exp(-lv2))


def _approx_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_nll(x, mean, log_scale):
    cx = x - mean
    inv = jnp.exp(-log_scale)
    cdf_plus = _approx_cdf(inv * (cx + 1 / 255))
    cdf_min = _approx_cdf(inv * (cx - 1 / 255))
    lp = jnp.where(
        x < -0.999,
        jnp.log(jnp.maximum(cdf_plus, 1e-12)),
        jnp.where(x > 0.999, jnp.log(jnp.maximum(1 - cdf_min, 1e-12)), jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))),
    )
    return -lp


def loss(net: SimpleMLPAdaLN, sched: Schedule, target, z, key, weight=None, scale: float = VAE_SCALE):
    """iDDPM training loss (epsilon MSE + variational bound for the learned variance), mean over tokens.

    target: [N, Cvae] residual tokens (unscaled); z: [N, z_channels]; weight: optional [N] mask. Timesteps and
    noise are drawn from `key`; `loss_terms` gives the per-token terms for given ones."""
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (target.shape[0],), 0, sched.num_steps)
    mse, vb = loss_terms(net, sched, target / scale, z, t, jax.random.normal(kn, target.shape, target.dtype))
    per_token = mse + vb
    if weight is None:
        return jnp.mean(per_token)
    return jnp.sum(per_token * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def loss_terms(net: SimpleMLPAdaLN, sched: Schedule, x0, z, t, noise):
    """Per-token (epsilon MSE [N], variational bound in bits [N]) of the official `training_losses` for x0
    [N, Cvae] (already divided by the VAE scale), z [N, z_channels], timesteps t [N] of `sched`, noise [N, Cvae]."""
    xt = sched.c("sqrt_ac", t) * x0 + sched.c("sqrt_1m_ac", t) * noise
    out = net(xt, jnp.asarray(sched.timestep_map)[t], z)
    eps, v = jnp.split(out, 2, axis=-1)
    mse = jnp.mean((noise - eps) ** 2, -1)
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], -1)
    # true posterior q(x_{t-1} | x_t, x0) vs the model's (mean from the frozen eps, learned variance)
    true_mean = sched.c("coef1", t) * x0 + sched.c("coef2", t) * xt
    frac = (v + 1) / 2
    log_var = frac * sched.c("log_betas", t) + (1 - frac) * sched.c("post_log_var", t)
    x0_pred = sched.c("sqrt_recip_ac", t) * xt - sched.c("sqrt_recipm1_ac", t) * frozen[:, : x0.shape[1]]
    mean = sched.c("coef1", t) * x0_pred + sched.c("coef2", t) * xt
    kl = jnp.mean(_normal_kl(true_mean, sched.c("post_log_var", t), mean, log_var), -1) / math.log(2.0)
    nll = jnp.mean(_discretized_nll(x0, mean, 0.5 * log_var), -1) / math.log(2.0)
    return mse, jnp.where(t == 0, nll, kl)


def param_count(width: int, depth: int, in_channels: int, z_channels: int) -> int:
    """Parameters of SimpleMLPAdaLN (analytic; the released head has width 1024, depth 6, Cvae 32, z 1536)."""
    lin = lambda i, o: i * o + o  # noqa: E731
    n = lin(256, width) + lin(width, width) + lin(z_channels, width) + lin(in_channels, width)
    n += depth * (2 * width + 2 * lin(width, width) + lin(width, 3 * width))
    return n + lin(width, 2 * in_channels) + lin(width, 2 * width)
