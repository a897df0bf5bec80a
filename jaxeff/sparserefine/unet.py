"""The sparse U-Net of SparseRefine (`TorchSparseUNet`, `sparserefine/models/backbones/ts_unet.py:38-108`).

SparseConvNet-style, all kernels 3x3 (3x3x1 in the official 3-D TorchSparse code, z = 0 everywhere):
input conv (in -> planes[0], submanifold, no bias) -> U(level 0) -> BN -> ReLU, where U(level i) is
- `reps` pre-activation residual blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3, shortcut identity or 1x1 conv);
- if not the deepest level: skip = x; BN-ReLU-conv3x3 stride 2 (padding 0, sites by the downsample rule of
  `jaxeff.sparserefine.sparse`) -> U(level i+1) -> BN-ReLU-transposed conv3x3 stride 2 (onto level i's cached
  sites) -> concatenate [skip, up] (`JoinTable`) -> `reps` residual blocks, the first mapping 2C -> C.
BN is batch norm over the active points only (empty capacity slots are excluded from the statistics and kept at
zero), eps 1e-5, momentum 0.1, running variance updated with the unbiased batch variance (torch.nn.BatchNorm1d).
Conv weights are [K, Cin, Cout] initialised U(-s, s), s = 1 / sqrt(fan) with fan = Cin * K (Cout * K for the
transposed conv), as `torchsparse.nn.Conv3d.reset_parameters`.

Presets: `OFFICIAL_UNET` (planes 32..1024, 2 blocks per level, `configs/model/default.yaml`) and `TINY_UNET`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.sparserefine.sparse import DOWNSAMPLE_MODES, Pyramid
from pallas_kernels.sparse_conv import gather_matmul


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3
    planes: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    reps: int = 2
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    downsample: str = "spconv"  # official; "floor" is an option (see sparse.py)
    implementation: str | None = None  # gather_matmul dispatch: None | "pallas" | "xla"

    def __post_init__(self):
        if not self.planes or min(self.planes) < 1 or self.reps < 1 or self.in_channels < 1:
            raise ValueError(f"bad U-Net config: planes {self.planes}, reps {self.reps}, in {self.in_channels}")
        if self.downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {self.downsample!r}")

    @property
    def num_levels(self) -> int:
        return len(self.planes)


OFFICIAL_UNET = UNetConfig()
TINY_UNET = UNetConfig(planes=(8, 16), reps=1)


def uniform_init(key, shape, bound: float):
    """float32 U(-bound, bound) of `shape`. With a concrete key the draw is made by NumPy from the key's bits: one
    eager `jax.random.uniform` per distinct weight shape compiles a threefry program each (seconds per layer on
    a loaded CPU); under tracing (jit / eval_shape) it is `jax.random.uniform`."""
    if isinstance(key, jax.core.Tracer):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel()
    return jnp.asarray(np.random.default_rng(seed).uniform(-bound, bound, shape), jnp.float32)


class SparseConv(nnx.Module):
    """Sparse conv as `gather_matmul(x, table, weight)`; kernel_volume 1 is a pointwise (1x1) conv, no table."""

    def __init__(self, cin: int, cout: int, kernel_volume: int = 9, *, transposed: bool = False,
                 implementation: str | None = None, rngs: nnx.Rngs):
        fan = (cout if transposed else cin) * kernel_volume
        bound = fan ** -0.5
        self.weight = nnx.Param(uniform_init(rngs.params(), (kernel_volume, cin, cout), bound))
        self.implementation = implementation

    def __call__(self, x, table=None):
        w = self.weight[...]
        if table is None:
            if w.shape[0] != 1:
                raise ValueError("a 3x3 sparse conv needs a neighbour table")
            return x @ w[0].astype(x.dtype)
        return gather_matmul(x, table, w, implementation=self.implementation)


class PointBatchNorm(nnx.Module):
    """Batch norm over the valid rows of x [cap, C] (valid bool [cap]); invalid rows come out as 0."""

    def __init__(self, channels: int, *, eps: float = 1e-5, momentum: float = 0.1):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))
        self.eps, self.momentum = eps, momentum
        self.use_running_average = False

    def __call__(self, x, valid):
        v = valid[:, None].astype(jnp.float32)
        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            n = jnp.sum(v)
            mean = jnp.sum(xf * v, axis=0) / jnp.maximum(n, 1.0)
            var = jnp.sum(jnp.square(xf - mean) * v, axis=0) / jnp.maximum(n, 1.0)
            unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
            keep = n < 2  # torch refuses a one-point batch; here the running stats are left as they are
            m = self.momentum
            self.mean[...] = jnp.where(keep, self.mean[...], (1 - m) * self.mean[...] + m * mean)
            self.var[...] = jnp.where(keep, self.var[...], (1 - m) * self.var[...] + m * unbiased)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return (y * v).astype(x.dtype)


def _bn(c, cfg: UNetConfig):
    return PointBatchNorm(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum)


class ResBlock(nnx.Module):
    """Pre-activation residual block `res_block(m, a, b)` (ts_unet.py)."""

    def __init__(self, a: int, b: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        impl = cfg.implementation
        self.shortcut = None if a == b else SparseConv(a, b, 1, implementation=impl, rngs=rngs)
        self.bn1, self.conv1 = _bn(a, cfg), SparseConv(a, b, implementation=impl, rngs=rngs)
        self.bn2, self.conv2 = _bn(b, cfg), SparseConv(b, b, implementation=impl, rngs=rngs)

    def __call__(self, x, table, valid):
        h = self.conv1(jax.nn.relu(self.bn1(x, valid)), table)
        h = self.conv2(jax.nn.relu(self.bn2(h, valid)), table)
        return (x if self.shortcut is None else self.shortcut(x)) + h


class UBlock(nnx.Module):
    """`U(reps, nPlanes)` at `level` (ts_unet.py), recursing into the coarser levels."""

    def __init__(self, cfg: UNetConfig, level: int, *, rngs: nnx.Rngs):
        c = cfg.planes[level]
        self.level = level
        self.blocks = nnx.List([ResBlock(c, c, cfg, rngs=rngs) for _ in range(cfg.reps)])
        self.deeper = level + 1 < cfg.num_levels
        if self.deeper:
            c2, impl = cfg.planes[level + 1], cfg.implementation
            self.down_bn = _bn(c, cfg)
            self.down = SparseConv(c, c2, implementation=impl, rngs=rngs)
            self.inner = UBlock(cfg, level + 1, rngs=rngs)
            self.up_bn = _bn(c2, cfg)
            self.up = SparseConv(c2, c, transposed=True, implementation=impl, rngs=rngs)
            self.post = nnx.List([ResBlock(2 * c if i == 0 else c, c, cfg, rngs=rngs) for i in range(cfg.reps)])

    def __call__(self, x, pyr: Pyramid):
        i = self.level
        valid, table = pyr.levels[i].valid, pyr.subm[i]
        for blk in self.blocks:
            x = blk(x, table, valid)
        if not self.deeper:
            return x
        coarse_valid = pyr.levels[i + 1].valid
        h = self.down(jax.nn.relu(self.down_bn(x, valid)), pyr.down[i])
        h = self.inner(h, pyr)
        h = self.up(jax.nn.relu(self.up_bn(h, coarse_valid)), pyr.up[i])
        x = jnp.concatenate([x, h], axis=-1)
        for blk in self.post:
            x = blk(x, table, valid)
        return x


class SparseUNet(nnx.Module):
    """features [cap0, in_channels] on pyramid level 0 -> [cap0, planes[0]] (zeros in empty slots)."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.stem = SparseConv(cfg.in_channels, cfg.planes[0], implementation=cfg.implementation, rngs=rngs)
        self.u = UBlock(cfg, 0, rngs=rngs)
        self.bn = _bn(cfg.planes[0], cfg)

    def __call__(self, x, pyr: Pyramid):
        if len(pyr.levels) != self.cfg.num_levels:
            raise ValueError(f"pyramid has {len(pyr.levels)} levels, the U-Net {self.cfg.num_levels}")
        valid = pyr.levels[0].valid
        x = self.stem(x, pyr.subm[0])
        return jax.nn.relu(self.bn(self.u(x, pyr), valid))


def unet_flops(cfg: UNetConfig, counts) -> int:
    """Multiply-add x 2 of the U-Net's convs for active-site counts per level (counts[i] = sites at level i),
    counting every 3x3 offset as present (an upper bound; the gather skips nothing in this implementation)."""
    p, r, f = cfg.planes, cfg.reps, 0
    f += counts[0] * 9 * cfg.in_channels * p[0]
    for i, c in enumerate(p):
        f += counts[i] * r * 2 * 9 * c * c  # pre blocks
        if i + 1 < len(p):
            c2 = p[i + 1]
            f += counts[i + 1] * 9 * c * c2 + counts[i] * 9 * c2 * c  # down, up
            f += counts[i] * (9 * 2 * c * c + 9 * c * c + 2 * c * c + (r - 1) * 2 * 9 * c * c)  # post blocks
    return 2 * int(f)
