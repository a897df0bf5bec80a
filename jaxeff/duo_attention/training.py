"""Retrieval-head identification: train one gate alpha per (layer, KV head) with the decoder frozen.

The official two-way forward (`llama_duo_attention_forward_two_way`): the batch runs as [teacher; student]. The
teacher half is the frozen model with full causal attention. In the student half every layer outputs
`alpha * full_teacher + (1 - alpha) * streaming_student`, where `full_teacher` is the teacher's attention output of
the same layer (not recomputed from the student's hidden states) and `streaming_student` is sink + recent (Λ)
attention over the student's own q/k/v. Loss: MSE between the final-norm hidden states of the two halves, averaged
over the hidden dimension, summed over the answer tokens and divided by their count, plus `reg_weight * mean|alpha|`
(`duo_attn/train.py:124-156`).

Official choices kept by default (duo-attention@fe93c31; `GateTrainConfig` names the alternatives):
- Streaming mask: block-granular as Block-Sparse-Attention's `block_streaming_attn_func` (the released patterns'
  `blocksparse`): 128-token blocks, ceil(sink/128) sink blocks, ceil(recent/128) local blocks counted from the
  diagonal, so with 128 / 256 a query sees 129-256 recent tokens (`duo_attn/patch/llama.py:450-462`).
  `streaming_mask="token"` is the token-exact `sdpa` option.
- Learning rate: lr * min(1, max((s+1)/W, 0.1), max((N-s)/W, 0.1)), W = N // 5 (`train.py:346-353`).
- Clamping: gates start at 1, are clamped to [0, 1] at the start of every step (`train.py:98-102`; none after the
  last one, so the result may sit slightly outside [0, 1], as the released TSVs) and in the forward pass
  (`llama.py:121`), with torch's gradients: clamp passes the full gradient on [0, 1] bounds included, |x| has
  gradient 0 at 0 (`torch_clamp01`, `torch_abs`).
- Gates are float32 by default; `gate_dtype="model"` keeps them (and AdamW's moments) in the model dtype, as the
  official bf16 parameter.

The gates are a separate [layers, kv_heads] array; the model's weights are a constant of the step. Streaming
attention goes through `pallas_kernels.hybrid_attention` (all heads streaming, `window_block` for the block mask),
so its cost is O(S * (sink + recent)). Executed on CPU only.
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
from jaxeff import distributed
from jaxeff.checks import require_int, require_number
from jaxeff.duo_attention.calibration import MultiPasskeyData

# pallas_kernels.hybrid_attention's implementations
_IMPLEMENTATIONS = (None, "pallas", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class GateTrainConfig:
    """Gate-training settings; the defaults are the official run's (`scripts/train.sh`, every released
    `config.json`). streaming_mask: "block" (official `blocksparse`, `mask_block`-token blocks) or "token"
    (token-exact, the official `sdpa` option). gate_dtype: "float32" or "model" (the model's dtype, official).
    ValueError naming the field and its valid range for any value out of range."""

    sink: int = 128
    recent: int = 256
    steps: int = 2000
    lr: float = 0.02
    warmup_steps: int | None = None  # W of the schedule's rise; default steps // 5 (official 400 of 2000)
    decay_steps: int | None = None  # W of the schedule's fall; default steps // 5
    lr_floor: float = 0.1  # the multiplier never goes below it
    reg_weight: float = 0.05
    initial_value: float = 1.0
    implementation: str | None = None  # hybrid_attention implementation
    streaming_mask: str = "block"
    mask_block: int = 128
    gate_dtype: str = "float32"

    def __post_init__(self):
        name = "GateTrainConfig."
        for field, low in (("sink", 0), ("recent", 1), ("steps", 1), ("mask_block", 1)):
            require_int(getattr(self, field), name + field, low)
        for field in ("warmup_steps", "decay_steps"):
            if getattr(self, field) is not None:
                require_int(getattr(self, field), name + field + " (None = steps // 5)", 1)
        require_number(self.lr, name + "lr", 0.0, open_minimum=True)
        require_number(self.lr_floor, name + "lr_floor", 0.0, 1.0)
        require_number(self.reg_weight, name + "reg_weight", 0.0)
        require_number(self.initial_value, name + "initial_value (gates are clamped to [0, 1])", 0.0, 1.0)
        if self.implementation not in _IMPLEMENTATIONS:
            raise ValueError(f"{name}implementation must be one of {_IMPLEMENTATIONS} (pallas_kernels."
                             f"hybrid_attention's), got {self.implementation!r}")
        if self.streaming_mask not in ("block", "token"):
            raise ValueError(f"streaming_mask must be 'block' or 'token', got {self.streaming_mask!r}")
        if self.gate_dtype not in ("float32", "model"):
            raise ValueError(f"gate_dtype must be 'float32' or 'model', got {self.gate_dtype!r}")

    @property
    def window_block(self) -> int:
        return self.mask_block if self.streaming_mask == "block" else 1


def gate_schedule(cfg: GateTrainConfig) -> optax.Schedule:
    """lr * min(1, max((s + 1) / W_up, floor), max((N - s) / W_down, floor)) at step s (0-based), N = cfg.steps:
    the official `LambdaLR` (`duo_attn/train.py:346-353`, W = N // 5, floor 0.1). Flat at the floor for the first
    steps, (s + 1) / W up to 1, flat, then (N - s) / W down to the floor."""
    warm = max(cfg.steps // 5 if cfg.warmup_steps is None else cfg.warmup_steps, 1)
    decay = max(cfg.steps // 5 if cfg.decay_steps is None else cfg.decay_steps, 1)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        up = jnp.maximum((s + 1) / warm, cfg.lr_floor)
        down = jnp.maximum((cfg.steps - s) / decay, cfg.lr_floor)
        return cfg.lr * jnp.minimum(1.0, jnp.minimum(up, down))

    return schedule


@jax.custom_jvp
def torch_clamp01(x):
    """clip(x, 0, 1) with torch.clamp's gradient: 1 on [0, 1] bounds included (jnp.clip gives 1/2 at a bound,
    and every gate starts on the bound 1)."""
    return jnp.clip(x, 0, 1)


@torch_clamp01.defjvp
def _clamp_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return torch_clamp01(x), jnp.where((x >= 0) & (x <= 1), t, jnp.zeros_like(t))


@jax.custom_jvp
def torch_abs(x):
    """|x| with torch.abs's gradient: sign(x), 0 at 0 (jnp.abs gives 1 there)."""
    return jnp.abs(x)


@torch_abs.defjvp
def _abs_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * t


def group_gates(gates: jnp.ndarray, num_q_heads: int) -> jnp.ndarray:
    """[Hkv] gates -> [Hq] (each KV head's clamped alpha shared by its GQA group of query heads, `llama.py:120-125`)."""
    return jnp.repeat(torch_clamp01(gates), num_q_heads // gates.shape[0])


def two_way_attention_fn(gates: jnp.ndarray, *, sink: int, recent: int, implementation: str | None = None,
                         window_block: int = 128):
    """`attention_fn` for a [teacher; student] batch; gates [layers, kv_heads]. window_block: 128 is the official
    block-granular streaming mask, 1 the token-exact one (`pallas_kernels.hybrid_attention`)."""

    def fn(layer, q, k, v, *, q_positions, kv_positions):
        b = q.shape[0] // 2
        # The teacher through the same block-sparse kernel with every head dense (flash-style on GPU/TPU, cuDNN on
        # a GPU in bf16): no [S, S] score matrix at calibration lengths. Training positions are contiguous.
        full = jax.lax.stop_gradient(pallas_kernels.hybrid_attention(
            q[:b], k[:b], v[:b], streaming_heads=np.zeros(k.shape[2], bool), sink=0, local=1,
            implementation=implementation))
        stream = pallas_kernels.hybrid_attention(
            q[b:], k[b:], v[b:], streaming_heads=np.ones(k.shape[2], bool), sink=sink, local=recent,
            implementation=implementation, window_block=window_block)
        a = group_gates(gates[layer], q.shape[2])[None, None, :, None].astype(q.dtype)
        return jnp.concatenate([full, a * full + (1 - a) * stream], axis=0)

    return fn


def gate_loss(gates, model, tokens, mask, *, sink: int, recent: int, reg_weight: float,
              implementation: str | None = None, window_block: int = 128):
    """(loss, metrics) of the two-way forward; tokens [B, S], mask [B, S] marks the answer tokens. The regulariser
    is mean |gates| on the gates as given (already clamped at the step's start, as `train.py:98-102`)."""
    fn = two_way_attention_fn(gates, sink=sink, recent=recent, implementation=implementation,
                              window_block=window_block)
    hidden = model(jnp.concatenate([tokens, tokens], axis=0), attention_fn=fn, output="hidden")
    b = tokens.shape[0]
    teacher, student = jax.lax.stop_gradient(hidden[:b]), hidden[b:]
    per_token = jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)), axis=-1)
    m = mask.astype(jnp.float32)
    distill = jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0)
    reg = jnp.mean(torch_abs(gates.astype(jnp.float32)))
    return distill + reg_weight * reg, {"distill": distill, "reg": reg}


def _check_batch(batch, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of a gate-training batch; ValueError naming what is wrong (the jitted step would fail deep
    inside, or train on nothing: an out-of-vocabulary id is silently clamped by the embedding lookup, an all-zero
    mask leaves only the regulariser, which drives every gate to 0)."""
    if not isinstance(batch, Mapping) or not {"tokens", "mask"} <= set(batch):
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"a gate-training batch is a dict with 'tokens' and 'mask' (as MultiPasskeyData.batches "
                         f"yields), got {keys}")
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or not tokens.size:
        raise ValueError(f"batch['tokens'] must be integer ids [batch, seq] (one row: tokens[None]), got "
                         f"{tokens.dtype} {tokens.shape}")
    if mask.shape != tokens.shape:
        raise ValueError(f"batch['mask'] has shape {mask.shape}, batch['tokens'] {tokens.shape}: they must match")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0]
        raise ValueError(f"batch['tokens'] holds id {int(bad)} outside the model's vocabulary [0, {vocab_size})")
    if not np.any(mask):
        raise ValueError("batch['mask'] marks no answer token: the distillation loss would be 0 and the "
                         "regulariser alone would push every gate to 0")
    return tokens, mask


def make_gate_step(model, cfg: GateTrainConfig, mesh=None):
    """Returns (init_opt_state(gates), jitted step(gates, opt_state, batch) -> (gates, opt_state, metrics)).

    A step clamps the gates to [0, 1], then takes one AdamW step (weight decay 0) from them, unclamped.
    mesh: a data-parallel mesh (axis "data", e.g. `Run.mesh`): the model's weights are replicated on it and every
    batch, the same global batch on every process, is sharded over its rows (batch size a multiple of the axis);
    gates and optimizer state must then be replicated too (`jaxeff.distributed.replicate`, as `train_gates` does)."""
    tx = optax.adamw(gate_schedule(cfg), weight_decay=0.0)
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = distributed.replicate(state, mesh)

    @jax.jit
    def step(gates, opt_state, state, tokens, mask):
        gates = jnp.clip(gates, 0.0, 1.0)  # in place at the iteration's start (train.py:98-102)

        def loss_fn(g):
            return gate_loss(g, nnx.merge(graphdef, state), tokens, mask, sink=cfg.sink, recent=cfg.recent,
                             reg_weight=cfg.reg_weight, implementation=cfg.implementation,
                             window_block=cfg.window_block)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(gates)
        updates, opt_state = tx.update(grads, opt_state, gates)
        return optax.apply_updates(gates, updates), opt_state, dict(metrics, loss=loss)

    def run_step(gates, opt_state, batch: Mapping[str, np.ndarray]):
        arrays = _check_batch(batch, model.config.vocab_size)
        if mesh is None:
            return step(gates, opt_state, state, *map(jnp.asarray, arrays))
        start, stop = distributed.process_rows(mesh, arrays[0].shape[0])
        return step(gates, opt_state, state, *distributed.shard_batch([x[start:stop] for x in arrays], mesh))

    return tx.init, run_step


def train_gates(model, batches: Iterable[Mapping[str, np.ndarray]], cfg: GateTrainConfig,
                log: Callable[[int, dict], None] | None = None, progress: Callable | None = None,
                mesh=None) -> np.ndarray:
    """Identify retrieval heads; returns the raw gates alpha float32 [layers, kv_heads]: after the last optimizer
    step, not clamped (as the official TSVs, which may hold values slightly below 0; loaders and
    `select_retrieval_heads` clip).

    batches: yields {"tokens": int [B, S], "mask": [B, S] answer tokens}, e.g. `MultiPasskeyData.batches(seed)`;
    `cfg.steps` of them are consumed. ValueError for a batch of another form (`_check_batch`: ids outside the
    vocabulary, no answer token, ...) or when batches end before cfg.steps.
    log(step, metrics) is called every 10 steps; progress wraps the step range (e.g. tqdm).
    mesh: data parallel over its "data" axis (`make_gate_step`); every process must yield the same global batches.
    """
    if isinstance(batches, MultiPasskeyData):
        raise TypeError("train_gates takes batches, not the data set: pass data.batches(seed=0)")
    mc = model.config
    dtype = jnp.float32 if cfg.gate_dtype == "float32" else model.dtype
    gates = jnp.full((mc.num_hidden_layers, mc.num_key_value_heads), cfg.initial_value, dtype)
    init, step = make_gate_step(model, cfg, mesh)
    opt_state = init(gates)
    if mesh is not None:
        gates, opt_state = distributed.replicate((gates, opt_state), mesh)
    it = iter(batches)
    steps = range(cfg.steps) if progress is None else progress(range(cfg.steps))
    for i in steps:
        batch = next(it, None)
        if batch is None:
            raise ValueError(f"batches ended after {i} steps but GateTrainConfig.steps is {cfg.steps}")
        gates, opt_state, metrics = step(gates, opt_state, batch)
        if log is not None and ((i + 1) % 10 == 0 or i + 1 == cfg.steps):
            log(i + 1, {k: float(v) for k, v in jax.device_get(metrics).items()})
    return np.asarray(gates.astype(jnp.float32))
