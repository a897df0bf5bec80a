"""SparseRefine: entropy selector, sparse U-Net refiner, gated / entropy ensemblers, loss and training recipe.

Official sources (mit-han-lab/sparserefine @ 8bf3f4b): `models/selectors/entropy.py:16-19`,
`models/featurizers/ts_sparse.py:16-42`, `models/refiner.py:24-48`, `models/ensemblers/gated.py:7-33`,
`models/ensemblers/entropy.py:7-13`, `configs/losses/xent.yaml`, `configs/experiment/*.yaml`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.sparserefine.sparse import build_pyramid, check_capacity, level_capacities
from jaxeff.sparserefine.unet import TINY_UNET, SparseUNet, UNetConfig, uniform_init

# Entropy thresholds of the official experiment configs (configs/experiment/*.yaml), by low-res base model.
TAU = {"hrnet_w48": 0.3, "segformer_b5": 0.1, "segnext_l": 0.1, "mask2former_t": 0.05, "mask2former_l": 0.005}
ENSEMBLERS = ("gated", "entropy")
IGNORE_INDEX = 255


def entropy(logits, axis: int = -1):
    """H = -sum p log(clamp(p, 1e-5)), p = softmax(logits) (the official clamp, quirk 3); float32 [...]."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=axis)
    return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-5)), axis=axis)


def entropy_select(logits, tau: float):
    """Selection mask `entropy(logits) > tau`: logits [..., C] -> bool [...] (`EntropySelector`)."""
    return entropy(logits) > tau


class GatedEnsembler(nnx.Module):
    """y = fuser(w1 * l1 + w2 * l2), w = softmax(attn([p1, e1, p2, e2])) (`GatedEnsembler`, gated.py).

    attn: Linear(2(C+1) -> 64) - ReLU - Linear(64 -> 2); fuser: Linear(C -> 64) - ReLU - Linear(64 -> C); torch
    Linear initialisation (weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))). l1, l2 [N, C] -> [N, C]."""

    def __init__(self, num_classes: int, hidden: int = 64, *, rngs: nnx.Rngs):
        c = num_classes
        self.attn1, self.attn2 = _linear(2 * (c + 1), hidden, rngs), _linear(hidden, 2, rngs)
        self.fuse1, self.fuse2 = _linear(c, hidden, rngs), _linear(hidden, c, rngs)

    def gate(self, l1, l2):
        feats = [jax.nn.softmax(l1, -1), entropy(l1)[..., None], jax.nn.softmax(l2, -1), entropy(l2)[..., None]]
        return jax.nn.softmax(self.attn2(jax.nn.relu(self.attn1(jnp.concatenate(feats, -1)))), axis=-1)

    def __call__(self, l1, l2):
        w = self.gate(l1, l2)
        return self.fuse2(jax.nn.relu(self.fuse1(w[..., :1] * l1 + w[..., 1:] * l2)))


class EntropyEnsembler(nnx.Module):
    """Per point, the branch with the lower entropy: where(e1 < e2, l1, l2) (`EntropyEnsembler`)."""

    def __call__(self, l1, l2):
        return jnp.where((entropy(l1) < entropy(l2))[..., None], l1, l2)


def _linear(din, dout, rngs):
    bound = din ** -0.5
    init = lambda key, shape, dtype=jnp.float32: uniform_init(key, shape, bound).astype(dtype)  # noqa: E731
    return nnx.Linear(din, dout, kernel_init=init, bias_init=init, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """num_classes: 19 on Cityscapes. tau: entropy threshold (`TAU` presets). capacity: static number of selected
    points per batch at level 0 (None: every pixel, never overflows); coarse_ratio: see `level_capacities`."""

    num_classes: int = 19
    unet: UNetConfig = TINY_UNET
    ensembler: str = "gated"
    tau: float = 0.3
    capacity: int | None = None
    coarse_ratio: float = 1.0

    def __post_init__(self):
        if self.ensembler not in ENSEMBLERS:
            raise ValueError(f"ensembler must be one of {ENSEMBLERS}, got {self.ensembler!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1 or None, got {self.capacity}")

    def capacities(self, shape: tuple[int, int, int]) -> tuple[int, ...]:
        cap = int(np.prod(shape)) if self.capacity is None else self.capacity
        return level_capacities(cap, self.unet.num_levels, shape, self.coarse_ratio)


class SparseRefiner(nnx.Module):
    """Selector -> featurizer (RGB of the selected pixels) -> sparse U-Net -> Linear(planes[0] -> C) -> ensembler.

    `__call__(image, logits, mask=None)`: image float [B, H, W, 3] (normalised), logits float [B, H, W, C]
    (the low-res model's logits already resized to H x W, see `jaxeff.sparserefine.data`), mask bool [B, H, W]
    (default: `entropy_select(logits, cfg.tau)`). Returns a dict (`SparseRefiner.forward`, refiner.py):
    - "logits/{i,o,e}/mask" [cap, C]: input, refined and ensembled logits of the selected points (rows past
      "valid" are padding); "coords" int32 [cap, 3] (b, y, x); "valid" bool [cap];
    - "logits/{o,e}/full" [B, H, W, C]: logits with the selected pixels replaced;
    - "mask", "overflow" (bool []), "counts" (int32 [levels]: wanted sites per level).
    `capacities` (static ints, one per U-Net level) overrides `cfg.capacities(shape)` for this call: choose them
    on the host from `pyramid_counts(mask, ...)` with `bucket_capacities` to size each image's program to its
    selection instead of the worst case (the official TorchSparse code has dynamic shapes).
    Outside jit a capacity overflow raises `CapacityError`; under jit call `check_capacity(out["overflow"], ...)`
    on the result (`SparseRefiner.check`)."""

    def __init__(self, cfg: RefinerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.unet = SparseUNet(cfg.unet, rngs=rngs)
        self.classifier = _linear(cfg.unet.planes[0], cfg.num_classes, rngs)
        self.ensembler = GatedEnsembler(cfg.num_classes, rngs=rngs) if cfg.ensembler == "gated" \
            else EntropyEnsembler()

    def __call__(self, image, logits, mask=None, *, capacities: tuple[int, ...] | None = None):
        cfg = self.cfg
        if image.ndim != 4 or image.shape[-1] != cfg.unet.in_channels:
            raise ValueError(f"image must be [B, H, W, {cfg.unet.in_channels}], got {image.shape}")
        if logits.shape != image.shape[:3] + (cfg.num_classes,):
            raise ValueError(f"logits must be {image.shape[:3] + (cfg.num_classes,)} (upsample the low-res logits "
                             f"to the image size first), got {logits.shape}")
        if mask is None:
            mask = entropy_select(logits, cfg.tau)
        elif mask.shape != image.shape[:3]:
            raise ValueError(f"mask must be {image.shape[:3]}, got {mask.shape}")
        caps = cfg.capacities(tuple(mask.shape)) if capacities is None else tuple(capacities)
        if len(caps) != cfg.unet.num_levels or min(caps) < 1:
            raise ValueError(f"capacities must be {cfg.unet.num_levels} ints >= 1, got {caps}")
        pyr = build_pyramid(mask.astype(bool), caps, cfg.unet.downsample)
        lv = pyr.levels[0]
        b, y, x = lv.coords.T
        valid = lv.valid[:, None]
        feats = jnp.where(valid, image[b, y, x].astype(jnp.float32), 0.0)
        yo = self.classifier(self.unet(feats, pyr))
        yi = logits[b, y, x].astype(jnp.float32)
        ye = self.ensembler(yi, yo)
        out = {"logits/i/mask": yi, "logits/o/mask": yo, "logits/e/mask": ye, "coords": lv.coords,
               "valid": lv.valid, "mask": mask, "overflow": pyr.overflow, "counts": pyr.counts}
        for name, val in (("o", yo), ("e", ye)):
            out[f"logits/{name}/full"] = paste(logits, out, val)
        if not isinstance(out["overflow"], jax.core.Tracer):
            self.check(out, caps)
        return out

    def check(self, out, capacities: tuple[int, ...] | None = None) -> None:
        """Raises `CapacityError` if the call that produced `out` dropped sites (call outside jit); pass the
        call's `capacities` if it overrode the config's."""
        caps = self.cfg.capacities(tuple(out["mask"].shape)) if capacities is None else capacities
        check_capacity(out["overflow"], out["counts"], caps)


def paste(logits, out, values):
    """logits [B, H, W, C] with the selected pixels of `out` (a `SparseRefiner` output) replaced by values [cap, C]
    (padding rows are dropped)."""
    b, y, x = out["coords"].T
    drop_b = jnp.where(out["valid"], b, logits.shape[0])  # out of range: dropped
    return logits.at[drop_b, y, x].set(values.astype(logits.dtype), mode="drop")


def refiner_loss(out, labels, ignore_index: int = IGNORE_INDEX):
    """Cross-entropy (ignore `ignore_index`, mean over the kept points) of the refined and of the ensembled logits
    at the selected points, summed with weight 1 (`configs/losses/xent.yaml`). labels int [B, H, W].
    Returns (loss, {"ce_o", "ce_e", "points"})."""
    b, y, x = out["coords"].T
    lab = labels[b, y, x].astype(jnp.int32)
    keep = out["valid"] & (lab != ignore_index)
    n = jnp.maximum(jnp.sum(keep), 1)
    safe = jnp.where(keep, lab, 0)

    def ce(logits):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, safe) * keep) / n

    ce_o, ce_e = ce(out["logits/o/mask"]), ce(out["logits/e/mask"])
    return ce_o + ce_e, {"ce_o": ce_o, "ce_e": ce_e, "points": jnp.sum(keep)}


def epoch_cosine_schedule(lr: float, steps_per_epoch: int, epochs: int):
    """CosineAnnealingLR(T_max = epochs, eta_min 0) stepped once per epoch: lr/2 (1 + cos(pi floor(step/spe) / T)),
    0 after `epochs` epochs (`configs/scheduler/cosine.yaml`)."""
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"steps_per_epoch and epochs must be >= 1, got {steps_per_epoch}, {epochs}")

    def schedule(step):
        epoch = jnp.minimum(step // steps_per_epoch, epochs)
        return 0.5 * lr * (1 + jnp.cos(jnp.pi * epoch / epochs))

    return schedule


def official_optimizer(steps_per_epoch: int, epochs: int = 500, lr: float = 3e-4, weight_decay: float = 0.05):
    """AdamW(lr 3e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.05) with `epoch_cosine_schedule`
    (`configs/optimizer`, `configs/experiment/*.yaml`: 500 epochs)."""
    return optax.adamw(epoch_cosine_schedule(lr, steps_per_epoch, epochs), b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=weight_decay)


def make_train_step(graphdef, tx, labels_key: str = "label"):
    """Jitted `step(params, stats, opt_state, batch) -> (params, stats, opt_state, metrics)` for a refiner split
    as `graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)`: the BN running statistics are
    updated too. batch: {"image", "logits", labels_key, optional "mask"}. A capacity overflow does not raise
    under jit: metrics["overflow"] says whether sites were dropped (check it on the host)."""

    def loss_fn(params, stats, batch):
        stats = jax.tree.map(jnp.asarray, stats)  # fresh BatchStat variables at this trace level (BN mutates them)
        model = nnx.merge(graphdef, params, stats)
        out = model(batch["image"], batch["logits"], batch.get("mask"))
        loss, metrics = refiner_loss(out, batch[labels_key])
        return loss, (nnx.state(model, nnx.BatchStat), dict(metrics, overflow=out["overflow"]))

    @jax.jit
    def step(params, stats, opt_state, batch):
        (loss, (stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, stats, opt_state, dict(metrics, loss=loss)

    return step
