"""A functional train step: model state split once, the step is a pure jitted function of arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    schedule: str = "cosine"  # cosine | constant | linear
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant", "linear"):
            raise ValueError(f"schedule must be cosine, constant or linear, got {self.schedule!r}")


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    warm = max(cfg.warmup_steps, 1)
    decay = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, warm + decay, cfg.lr * cfg.min_lr_ratio)
    if cfg.schedule == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warm), optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, decay)],
            [warm],
        )
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)], [warm])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


@struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any  # trainable variables (nnx.State)
    opt_state: Any
    frozen: Any  # everything else (nnx.State): frozen weights, buffers


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, trainable=nnx.Param, *, mesh=None):
    """Split `model` into (graphdef, TrainState); `trainable` is an NNX filter choosing what the optimizer updates.

    With `mesh` (e.g. `Run.mesh`), the whole state becomes global `jax.Array`s replicated over the mesh's devices
    on every process (data parallelism: feed batches from `jaxeff.distributed.shard_batch`); every process must
    build `model` from the same seed. The train step donates the state's buffers, which `model` shares: after the
    first step use `merge(graphdef, state)`, not `model`."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), frozen)
    if mesh is not None:
        from jaxeff.distributed import replicate

        state = replicate(state, mesh)
    return graphdef, state


def merge(graphdef, state: TrainState) -> nnx.Module:
    return nnx.merge(graphdef, state.params, state.frozen)


LossFn = Callable[[nnx.Module, Any], tuple[jnp.ndarray, dict]]


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    post_update: Callable[[Any], Any] | None = None):
    """Returns jitted `step(state, batch) -> (state, metrics)`.

    `loss_fn(model, batch) -> (loss, metrics)`; `post_update(params) -> params` runs after the optimizer (e.g.
    clamping DuoAttention's gates to [0, 1])."""

    def step(state: TrainState, batch):
        def wrapped(params):
            return loss_fn(nnx.merge(graphdef, params, state.frozen), batch)

        (loss, metrics), grads = jax.value_and_grad(wrapped, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if post_update is not None:
            params = post_update(params)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, donate_argnums=0)


def next_token_loss(logits: jnp.ndarray, tokens: jnp.ndarray, mask: jnp.ndarray | None = None):
    """Mean cross-entropy of predicting tokens[t+1] from logits[t] over positions where mask[t] is set."""
    targets = tokens[:, 1:]
    logits = logits[:, :-1].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    m = jnp.ones_like(ce) if mask is None else mask[:, :-1].astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)
