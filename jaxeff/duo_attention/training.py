"""Retrieval-head identification: train one gate alpha per (layer, KV head) with the decoder frozen.

The official two-way forward (`llama_duo_attention_forward_two_way`): the batch runs as [teacher; student]. The
teacher half is the frozen model with full causal attention. In the student half every layer outputs
`alpha * full_teacher + (1 - alpha) * streaming_student`, where `full_teacher` is the teacher's attention output of
the same layer (not recomputed from the student's hidden states) and `streaming_student` is sink + recent (Λ)
attention over the student's own q/k/v. Loss: MSE between the final-norm hidden states of the two halves, averaged
over the hidden dimension, summed over the answer tokens and divided by their count, plus `reg_weight * mean|alpha|`.
Gates start at 1 and are clamped to [0, 1] in the forward pass and after every optimizer step.

The gates are a separate float32 [layers, kv_heads] array; the model's weights are a constant of the step.
Streaming attention goes through `pallas_kernels.hybrid_attention` (all heads streaming), so its cost is
O(S * (sink + recent)). Executed on CPU only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import pallas_kernels
from jaxeff.nn import attention


@dataclasses.dataclass(frozen=True)
class GateTrainConfig:
    sink: int = 128
    recent: int = 256
    steps: int = 2000
    lr: float = 0.02
    warmup_steps: int | None = None  # default: steps // 5 (official 400 of 2000)
    decay_steps: int | None = None  # linear decay over the last steps; default steps // 5
    lr_floor: float = 0.1  # schedule starts and ends at lr * lr_floor
    reg_weight: float = 0.05
    initial_value: float = 1.0
    implementation: str | None = None  # hybrid_attention implementation

    def __post_init__(self):
        if self.sink < 0 or self.recent < 1 or self.steps < 1 or self.lr <= 0:
            raise ValueError(f"bad gate-training config {self}")


def gate_schedule(cfg: GateTrainConfig) -> optax.Schedule:
    """Warm-up from lr * floor, flat, then linear decay to lr * floor over the last `decay_steps` steps."""
    warm = cfg.steps // 5 if cfg.warmup_steps is None else cfg.warmup_steps
    decay = cfg.steps // 5 if cfg.decay_steps is None else cfg.decay_steps
    lo = cfg.lr * cfg.lr_floor
    flat = max(cfg.steps - warm - decay, 0)
    return optax.join_schedules(
        [optax.linear_schedule(lo, cfg.lr, max(warm, 1)), optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, lo, max(decay, 1))],
        [warm, warm + flat],
    )


def group_gates(gates: jnp.ndarray, num_q_heads: int) -> jnp.ndarray:
    """[Hkv] gates -> [Hq] (each KV head's alpha shared by its GQA group of query heads)."""
    return jnp.repeat(jnp.clip(gates, 0.0, 1.0), num_q_heads // gates.shape[0])


def two_way_attention_fn(gates: jnp.ndarray, *, sink: int, recent: int, implementation: str | None = None):
    """`attention_fn` for a [teacher; student] batch; gates [layers, kv_heads]."""

    def fn(layer, q, k, v, *, q_positions, kv_positions):
        b = q.shape[0] // 2
        full = jax.lax.stop_gradient(
            attention(q[:b], k[:b], v[:b], q_positions=q_positions[:b], kv_positions=kv_positions[:b]))
        stream = pallas_kernels.hybrid_attention(
            q[b:], k[b:], v[b:], streaming_heads=np.ones(k.shape[2], bool), sink=sink, local=recent,
            implementation=implementation)
        a = group_gates(gates[layer], q.shape[2])[None, None, :, None].astype(q.dtype)
        return jnp.concatenate([full, a * full + (1 - a) * stream], axis=0)

    return fn


def gate_loss(gates, model, tokens, mask, *, sink: int, recent: int, reg_weight: float,
              implementation: str | None = None):
    """(loss, metrics) of the two-way forward; tokens [B, S], mask [B, S] marks the answer tokens."""
    fn = two_way_attention_fn(gates, sink=sink, recent=recent, implementation=implementation)
    hidden = model(jnp.concatenate([tokens, tokens], axis=0), attention_fn=fn, output="hidden")
    b = tokens.shape[0]
    teacher, student = jax.lax.stop_gradient(hidden[:b]), hidden[b:]
    per_token = jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)), axis=-1)
    m = mask.astype(jnp.float32)
    distill = jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0)
    reg = jnp.mean(jnp.abs(jnp.clip(gates, 0.0, 1.0)))
    return distill + reg_weight * reg, {"distill": distill, "reg": reg}


def make_gate_step(model, cfg: GateTrainConfig):
    """Returns (init_opt_state(gates), jitted step(gates, opt_state, batch) -> (gates, opt_state, metrics))."""
    tx = optax.adamw(gate_schedule(cfg), weight_decay=0.0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(gates, opt_state, state, tokens, mask):
        def loss_fn(g):
            return gate_loss(g, nnx.merge(graphdef, state), tokens, mask, sink=cfg.sink, recent=cfg.recent,
                             reg_weight=cfg.reg_weight, implementation=cfg.implementation)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(gates)
        updates, opt_state = tx.update(grads, opt_state, gates)
        gates = jnp.clip(optax.apply_updates(gates, updates), 0.0, 1.0)
        return gates, opt_state, dict(metrics, loss=loss)

    def run_step(gates, opt_state, batch: Mapping[str, np.ndarray]):
        return step(gates, opt_state, state, jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))

    return tx.init, run_step


def train_gates(model, batches: Iterable[Mapping[str, np.ndarray]], cfg: GateTrainConfig,
                log: Callable[[int, dict], None] | None = None, progress: Callable | None = None) -> np.ndarray:
    """Identify retrieval heads; returns alpha float32 [layers, kv_heads] in [0, 1].

    batches: yields {"tokens": int [B, S], "mask": [B, S] answer tokens}; `cfg.steps` of them are consumed.
    log(step, metrics) is called every 10 steps; progress wraps the step range (e.g. tqdm).
    """
    mc = model.config
    gates = jnp.full((mc.num_hidden_layers, mc.num_key_value_heads), cfg.initial_value, jnp.float32)
    init, step = make_gate_step(model, cfg)
    opt_state = init(gates)
    it = iter(batches)
    steps = range(cfg.steps) if progress is None else progress(range(cfg.steps))
    for i in steps:
        gates, opt_state, metrics = step(gates, opt_state, next(it))
        if log is not None and ((i + 1) % 10 == 0 or i + 1 == cfg.steps):
            log(i + 1, {k: float(v) for k, v in jax.device_get(metrics).items()})
    return np.asarray(gates)
