"""LPD training: random orders, a schedule drawn per step, label drop, the official optimiser recipe.

Official (mit-han-lab/lpd `engine.py:81-87`, `main.py:41-67, 244-258`, `util/misc.py:291-303`):
- each sample gets a uniformly random order; each iteration draws one schedule (`random.choice` over the training
  tables), shared by the batch; here the host draws it and passes `step_of` [N] as data, so the static 2N + 1
  layout compiles once for all schedules;
- labels are dropped with p = 0.1 (`fake_latent`); cross-entropy over the N query outputs;
- AdamW b = (0.9, 0.95), weight decay 0.02 on every parameter with ndim >= 2 (so `pos_embed`, `mask_token` and
  `fake_latent` are decayed; biases and norms are not), global-norm clip 3.0, lr = blr * batch / 256 (blr 1e-4),
  linear warm-up, constant, then cosine to `min_lr` at the end ("constant+cosine").
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import optax
from flax import nnx

from jaxeff.lpd import _checks, schedules
from jaxeff.lpd.model import LPD, cross_entropy, drop_labels
from jaxeff.lpd.orders import random_orders


@dataclasses.dataclass(frozen=True)
class LPDOptimConfig:
    blr: float = 1e-4
    batch_size: int = 256
    warmup_steps: int = 100
    total_steps: int = 1000
    cosine_steps: int = 100  # the last `cosine_steps` decay to min_lr (official: epochs 400-450 of 450)
    min_lr: float = 1e-5
    weight_decay: float = 0.02
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 3.0

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / 256


def lr_schedule(cfg: LPDOptimConfig) -> optax.Schedule:
    """Linear warm-up -> constant -> cosine to min_lr (the official `constant+cosine`)."""
    warm = max(cfg.warmup_steps, 1)
    hold = max(cfg.total_steps - cfg.cosine_steps - warm, 0)
    cos = max(cfg.cosine_steps, 1)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr),
         optax.cosine_decay_schedule(cfg.lr, cos, alpha=cfg.min_lr / cfg.lr if cfg.lr else 0.0)],
        [warm, warm + hold])


def make_optimizer(cfg: LPDOptimConfig) -> optax.GradientTransformation:
    decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731  (official: not 1-D, not bias)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay))


def cosine_group_sizes(num_tokens: int, steps: int) -> tuple[int, ...]:
    """A schedule for token counts without official tables (e.g. the 8x8 toy): g1 = 1, then the remaining tokens
    along 1 - cos(pi/2 * t), every group >= 1. Not an official table (those have no closed form)."""
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps must be in [1, {num_tokens}], got {steps}")
    if steps == 1:
        return (num_tokens,)
    done = [1] + [1 + round((num_tokens - 1) * (1 - math.cos(math.pi / 2 * k / (steps - 1))))
                  for k in range(1, steps)]
    for k in range(1, steps):
        done[k] = max(done[k], done[k - 1] + 1)
    done[-1] = num_tokens
    for k in range(steps - 2, -1, -1):
        done[k] = min(done[k], done[k + 1] - 1)
    return schedules.check_group_sizes(np.diff([0] + done), num_tokens)


def training_schedules(num_tokens: int, steps=None) -> list[tuple[int, ...]]:
    """The official training lists for 256 / 1024 tokens; `cosine_group_sizes` for the given step counts
    otherwise."""
    res = {256: 256, 1024: 512}.get(num_tokens)
    if res is not None and steps is None:
        return [schedules.GROUP_SIZES[res][k] for k in schedules.TRAINING_STEPS[res]]
    if steps is None:
        raise ValueError(f"no official training schedules for N = {num_tokens}; pass the step counts")
    return [cosine_group_sizes(num_tokens, k) for k in steps]


def lpd_loss(model: LPD, batch: dict, *, mutual_visibility: bool = True):
    """Training loss. batch: tokens [B, N] int (raster VQ ids, not an image), labels [B] int, step_of [N] int
    (`schedules.step_of`), key (one PRNG key). Missing entries, wrong shapes and non-integer tokens / labels raise
    at trace time (`LPD.__call__`); ids out of range cannot be seen under jit and give a NaN loss."""
    missing = {"tokens", "labels", "step_of", "key"} - set(batch)
    if missing:
        raise KeyError(f"the LPD batch needs tokens, labels, step_of and key; missing {sorted(missing)}")
    if np.ndim(batch["tokens"]) != 2 or np.shape(batch["tokens"])[1] != model.config.num_tokens:
        raise ValueError(f"batch tokens must be [B, N = {model.config.num_tokens}] raster ids, got shape "
                         f"{np.shape(batch['tokens'])}")
    _checks.check_key(batch["key"], "batch key")
    k_order, k_drop, k_dropout = jax.random.split(batch["key"], 3)
    b, n = batch["tokens"].shape
    orders = random_orders(k_order, b, n)
    dropped = drop_labels(k_drop, b, model.config.label_drop_prob)
    logits = model(batch["tokens"], batch["labels"], orders, batch["step_of"], dropped,
                   mutual_visibility=mutual_visibility, rngs=nnx.Rngs(dropout=k_dropout))
    loss = cross_entropy(logits, batch["tokens"], orders).mean()
    return loss, {}
