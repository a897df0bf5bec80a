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

from jaxeff.checks import Registry
from jaxeff.sparserefine.data import require_normalised
from jaxeff.sparserefine.sparse import build_pyramid, check_capacity, level_capacities
from jaxeff.sparserefine.unet import TINY_UNET, SparseUNet, UNetConfig, uniform_init

# Entropy thresholds of the official experiment configs (configs/experiment/*.yaml), by low-res base model.
TAU = Registry("tau preset", dict(hrnet_w48=0.3, segformer_b5=0.1, segnext_l=0.1, mask2former_t=0.05,
                                  mask2former_l=0.005))
ENSEMBLERS = ("gated", "entropy")
SELECTORS = ("entropy", "learnable")
LOSSES = ("xent", "dice")
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


def _torch_init(fan_in):
    """torch's default Linear / Conv2d init: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in ** -0.5
    return lambda key, shape, dtype=jnp.float32: uniform_init(key, shape, bound).astype(dtype)


def _linear(din, dout, rngs):
    init = _torch_init(din)
    return nnx.Linear(din, dout, kernel_init=init, bias_init=init, rngs=rngs)


class LearnableSelector(nnx.Module):
    """`LearnableSelector` (`models/selectors/learnableSelector.py:10-39`), an option (no official experiment
    config uses it): f = ReLU(conv(ReLU(conv(image)))) (3 -> 16 -> 16, 3x3, padding 1), then
    mask = sigmoid(MLP([logits, f])) > threshold, MLP (C + 16) -> 32 -> 32 -> 1 with ReLUs.
    image float [B, H, W, 3], logits [B, H, W, C] -> bool [B, H, W]. As in the official code the mask is hard
    (no gradient reaches the selector through the refiner loss) and its unused `percentage` argument is dropped.
    Weights torch-style U(-1/sqrt(fan_in), 1/sqrt(fan_in)); `conv*.kernel` is HWIO (torch OIHW transposed)."""

    def __init__(self, num_classes: int, threshold: float, *, rngs: nnx.Rngs):
        self.threshold = threshold
        conv = lambda a, b: nnx.Conv(a, b, (3, 3), padding=1, kernel_init=_torch_init(9 * a),  # noqa: E731
                                     bias_init=_torch_init(9 * a), rngs=rngs)
        self.conv1, self.conv2 = conv(3, 16), conv(16, 16)
        self.mlp1, self.mlp2, self.mlp3 = _linear(num_classes + 16, 32, rngs), _linear(32, 32, rngs), \
            _linear(32, 1, rngs)

    def score(self, image, logits):
        """The pre-threshold probability sigmoid(MLP(...)) float32 [B, H, W]; a non-float image raises ValueError."""
        require_normalised(image, "LearnableSelector")
        f = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(image.astype(jnp.float32)))))
        h = jnp.concatenate([logits.astype(jnp.float32), f], -1)
        h = self.mlp3(jax.nn.relu(self.mlp2(jax.nn.relu(self.mlp1(h)))))
        return jax.nn.sigmoid(h[..., 0])

    def __call__(self, image, logits):
        return self.score(image, logits) > self.threshold


def feature_channels(features: tuple[str, ...], num_classes: int) -> int:
    """Input channels of the U-Net for featurizer `features`: rgb 3, xy 2, p and p>t C each."""
    return sum(3 if f == "rgb" else 2 if f == "xy" else num_classes for f in _check_features(features))


def _check_features(features):
    for f in features:
        if f not in ("rgb", "xy", "p") and not (f.startswith("p>") and _is_float(f[2:])):
            raise ValueError(f"unknown feature {f!r}; features are 'rgb', 'xy', 'p' and 'p>t' (t a float)")
    if not features:
        raise ValueError("features must not be empty")
    return features


def _is_float(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def featurize(image, logits, coords, valid, features: tuple[str, ...] = ("rgb",)):
    """Point features [cap, channels] of the sites coords int32 [cap, 3] (b, y, x), concatenated in `features`
    order (`TorchSparseFeaturizer`, `models/featurizers/ts_sparse.py:16-42`): "rgb" the image values, "xy"
    (y / H, x / W), "p" softmax(logits), "p>t" (softmax(logits) > t) as 0 / 1. Rows where `valid` is False are 0.
    image float [B, H, W, 3] (normalised; integer dtypes raise ValueError), logits [B, H, W, C]. Official default:
    ("rgb",)."""
    require_normalised(image, "featurize")
    b, y, x = coords.T
    h, w = image.shape[1:3]
    out = []
    for f in _check_features(features):
        if f == "rgb":
            out.append(image[b, y, x].astype(jnp.float32))
        elif f == "xy":
            out.append(jnp.stack([y / h, x / w], -1).astype(jnp.float32))
        else:
            p = jax.nn.softmax(logits[b, y, x].astype(jnp.float32), -1)
            out.append(p if f == "p" else (p > float(f[2:])).astype(jnp.float32))
    return jnp.where(valid[:, None], jnp.concatenate(out, -1), 0.0)


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """num_classes: 19 on Cityscapes. tau: the selector's threshold (entropy: `TAU` presets; learnable: on the
    sigmoid). capacity: static number of selected points per batch at level 0 (None: every pixel, never
    overflows); coarse_ratio: see `level_capacities`. selector: "entropy" (official configs) or "learnable"
    (`LearnableSelector`). features: featurizer inputs (`featurize`; official ("rgb",)); `unet.in_channels` must
    equal `feature_channels(features, num_classes)`. losses: terms of `refiner_loss` ("xent" official default,
    "dice" the `configs/losses/dice.yaml` variant)."""

    num_classes: int = 19
    unet: UNetConfig = TINY_UNET
    ensembler: str = "gated"
    tau: float = 0.3
    capacity: int | None = None
    coarse_ratio: float = 1.0
    selector: str = "entropy"
    features: tuple[str, ...] = ("rgb",)
    losses: tuple[str, ...] = ("xent",)

    def __post_init__(self):
        if self.ensembler not in ENSEMBLERS:
            raise ValueError(f"ensembler must be one of {ENSEMBLERS}, got {self.ensembler!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1 or None, got {self.capacity}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        if not self.losses or set(self.losses) - set(LOSSES):
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {self.losses}")
        want = feature_channels(tuple(self.features), self.num_classes)
        if self.unet.in_channels != want:
            raise ValueError(f"features {self.features} give {want} input channels but unet.in_channels is "
                             f"{self.unet.in_channels}")

    def capacities(self, shape: tuple[int, int, int]) -> tuple[int, ...]:
        cap = int(np.prod(shape)) if self.capacity is None else self.capacity
        return level_capacities(cap, self.unet.num_levels, shape, self.coarse_ratio)


class SparseRefiner(nnx.Module):
    """Selector -> featurizer (`cfg.features` of the selected pixels) -> sparse U-Net -> Linear(planes[0] -> C)
    -> ensembler.

    `__call__(image, logits, mask=None)`: image float [B, H, W, 3] normalised as the official loader does
    (`normalize_image`; a uint8 image raises ValueError), logits float [B, H, W, C]
    (the low-res model's logits already resized to H x W, see `jaxeff.sparserefine.data`), mask bool [B, H, W]
    (default: the selector's, `entropy_select(logits, cfg.tau)` or `LearnableSelector`). Returns a dict
    (`SparseRefiner.forward`, refiner.py):
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
        self.selector = LearnableSelector(cfg.num_classes, cfg.tau, rngs=rngs) if cfg.selector == "learnable" \
            else None

    def __call__(self, image, logits, mask=None, *, capacities: tuple[int, ...] | None = None):
        cfg = self.cfg
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"image must be [B, H, W, 3], got {image.shape}")
        require_normalised(image, "SparseRefiner")
        if logits.shape != image.shape[:3] + (cfg.num_classes,):
            raise ValueError(f"logits must be {image.shape[:3] + (cfg.num_classes,)} (upsample the low-res logits "
                             f"to the image size first), got {logits.shape}")
        if mask is None:
            mask = entropy_select(logits, cfg.tau) if self.selector is None else self.selector(image, logits)
        elif mask.shape != image.shape[:3]:
            raise ValueError(f"mask must be {image.shape[:3]}, got {mask.shape}")
        caps = cfg.capacities(tuple(mask.shape)) if capacities is None else tuple(capacities)
        if len(caps) != cfg.unet.num_levels or min(caps) < 1:
            raise ValueError(f"capacities must be {cfg.unet.num_levels} ints >= 1, got {caps}")
        pyr = build_pyramid(mask.astype(bool), caps, cfg.unet.downsample)
        lv = pyr.levels[0]
        b, y, x = lv.coords.T
        feats = featurize(image, logits, lv.coords, lv.valid, cfg.features)
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


def dice_loss(logits, labels, keep, eps: float = 1e-5):
    """`DiceLoss` (`sparserefine/losses/dice.py`): 1 - mean_c 2 sum(p t) / (sum(p + t) + eps) over the kept points,
    p = softmax(logits), t = one_hot(labels); every class counts in the mean, present or not (official).
    logits [N, C], labels int [N], keep bool [N] -> float32 []."""
    p = jax.nn.softmax(logits.astype(jnp.float32), -1) * keep[:, None]
    t = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32) * keep[:, None]
    return 1 - jnp.mean(2 * jnp.sum(p * t, 0) / (jnp.sum(p + t, 0) + eps))


def refiner_loss(out, labels, ignore_index: int = IGNORE_INDEX, losses: tuple[str, ...] = ("xent",)):
    """The official loss collection at the selected points, every term weight 1, on the refined ("o") and the
    ensembled ("e") logits: "xent" cross-entropy (ignore `ignore_index`, mean over the kept points,
    `configs/losses/xent.yaml`, the default) and / or "dice" (`dice_loss`, `configs/losses/dice.yaml`).
    labels int [B, H, W]. Returns (loss, metrics): "ce_o", "ce_e" (always reported), "dice_o", "dice_e" (with
    "dice"), "points"."""
    if not losses or set(losses) - set(LOSSES):
        raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {losses}")
    b, y, x = out["coords"].T
    lab = labels[b, y, x].astype(jnp.int32)
    keep = out["valid"] & (lab != ignore_index)
    n = jnp.maximum(jnp.sum(keep), 1)
    safe = jnp.where(keep, lab, 0)

    def ce(logits):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, safe) * keep) / n

    metrics = {"ce_o": ce(out["logits/o/mask"]), "ce_e": ce(out["logits/e/mask"]), "points": jnp.sum(keep)}
    loss = metrics["ce_o"] + metrics["ce_e"] if "xent" in losses else 0.0
    if "dice" in losses:
        metrics["dice_o"], metrics["dice_e"] = (dice_loss(out[f"logits/{k}/mask"], safe, keep) for k in "oe")
        loss = loss + metrics["dice_o"] + metrics["dice_e"]
    return loss, metrics


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
    updated too. batch: {"image", "logits", labels_key, optional "mask"}; the loss terms are `cfg.losses`. A
    capacity overflow does not raise under jit: metrics["overflow"] says whether sites were dropped (check it on
    the host)."""

    def loss_fn(params, stats, batch):
        stats = jax.tree.map(jnp.asarray, stats)  # fresh BatchStat variables at this trace level (BN mutates them)
        model = nnx.merge(graphdef, params, stats)
        out = model(batch["image"], batch["logits"], batch.get("mask"))
        loss, metrics = refiner_loss(out, batch[labels_key], losses=model.cfg.losses)
        return loss, (nnx.state(model, nnx.BatchStat), dict(metrics, overflow=out["overflow"]))

    @jax.jit
    def step(params, stats, opt_state, batch):
        (loss, (stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, stats, opt_state, dict(metrics, loss=loss)

    return step
