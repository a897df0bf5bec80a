"""duo_attention_passkey: identify retrieval heads of the llama_passkey model, then deploy them with the dual cache.

Gates are trained with the official two-way distillation (model frozen), the official block-granular streaming
mask scaled down (`mask_block`), LR schedule and clamping; the pattern is saved in the official format
(`<run>/pattern/`) and plotted. The character model trains on `PasskeyTask` examples at `train_context`; a model
with its own tokenizer (`model=`, no `pattern=`) trains on the official calibration recipe
(`jaxeff.duo_attention.MultiPasskeyData`, 1000-32000 tokens: a GPU/TPU job). Heads are selected with the official
quantile rule and seeded tie-breaking (`selection_seed`; the ties are reported). Deployment (dual KV cache, greedy
decoding of the key) is evaluated under each of `protocols` (`jaxeff.duo_attention.PROTOCOLS`: "niah" = chunked
prefill with `chunk_size` chunks, the first dense; "longbench" = one dense prefill, the last `decode_simulation`
prompt tokens as decode steps; "efficiency" = token-exact window from the first chunk) at longer contexts with the
top-r heads as retrieval heads, r random heads (subsets other than the top one) and no retrieval heads at all;
KV-cache bytes are measured on the cache and compared with r + (1 - r)(sink + recent)/L.

Multi-host: start the same command on every host. Gate training is data parallel over `Run.mesh` (every process
draws the same global batch and keeps its rows); only process 0 writes the pattern, results, plots and logs (the
runner's `Run.is_main`); evaluation runs the same greedy decoding on every process. Meshes this ran on: one CPU
device (smoke preset, 2-core CPU); gate training on a 4-device CPU mesh in one process equals the one-device result
(tests/multidevice/test_duo_attention_mesh.py). Not run on several hosts.

`full` preset: `model=/path/to/Llama-3-8B-Instruct-Gradient-1048k pattern=/path/to/its/duo_attn_pattern`
evaluates the released pattern on passkeys at 32K-128K tokens with the model's own tokenizer (GPU/TPU). `pattern=`
also takes a name that `jaxeff.duo_attention.load_pattern` downloads, e.g.
`pattern=github:mit-han-lab/duo-attention/attn_patterns/Llama-3-8B-Instruct-Gradient-1048k/lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10`
(the values of `jaxeff.duo_attention.pattern.RELEASED_PATTERNS`).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff import duo_attention as da
from jaxeff.data import PasskeyTask
from jaxeff.data.passkey import QUESTION
from jaxeff.duo_attention.evaluation import (
    check_model_and_pattern,
    key_matches,
    load_tokenizer,
    passkey_prompts,
    passkey_stamp,
    resolve_model,
)
from jaxeff.experiment import Run, register
from jaxeff.io import from_pretrained


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = ""  # HF-format directory; default: the shared llama_passkey export (resolve_model: the one in
    # checkpoints/ while it matches today's preset, else trained first and exported there)
    pattern: str = ""  # a pattern directory or an hf:/github: name (see load_pattern): skip identification
    seed: int = 0
    train_context: int = 256
    batch_size: int = 8
    steps: int = 300
    lr: float = 0.02
    reg_weight: float = 0.05
    sink: int = 16
    recent: int = 64
    sparsity: float = 0.5
    eval_contexts: tuple[int, ...] = (512, 1024)
    eval_examples: int = 50
    eval_batch: int = 25
    random_trials: int = 3
    chunk_size: int = 256  # prefill chunks of "niah" and "efficiency" (the shipped NIAH script: 32000)
    protocols: tuple[str, ...] = ("niah", "longbench", "efficiency")
    decode_simulation: int = 50  # "longbench": prompt tokens fed as decode steps
    streaming_mask: str = "block"  # gate training: "block" (official, `mask_block`-token blocks) or "token"
    mask_block: int = 16  # the official 128 scaled with sink / recent (1 sink block, 4 local blocks here)
    gate_dtype: str = "float32"  # or "model"
    selection_seed: int = 42  # tie-breaking noise of the head selection
    calib_context_min: int = 1000  # real-model identification (MultiPasskeyData); official 1000-32000
    calib_context_max: int = 32000
    dtype: str = "float32"
    require_model: bool = False  # the full preset: model= and pattern= must be given

    def validate(self):
        check_model_and_pattern(self.model, self.pattern, self.require_model)
        if not 0 < self.sparsity < 1:
            raise ValueError("sparsity must be in (0, 1)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("dtype must be float32 or bfloat16")
        unknown = set(self.protocols) - set(da.PROTOCOLS)
        if unknown or not self.protocols:
            raise ValueError(f"protocols must be among {sorted(da.PROTOCOLS)}, got {self.protocols}")
        da.GateTrainConfig(sink=self.sink, recent=self.recent, streaming_mask=self.streaming_mask,
                           mask_block=self.mask_block, gate_dtype=self.gate_dtype)
        PasskeyTask(context=self.train_context)


def answer_mask(tokens: np.ndarray, key_digits: int) -> np.ndarray:
    """Question + key tokens (the official labels are the QA tokens)."""
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, tokens.shape[1] - key_digits - len(QUESTION): tokens.shape[1] - 1] = 1.0
    return mask


def evaluate(model, mask, cfg: Config, context: int, protocol: str, tokenizer=None) -> dict:
    """Exact match, KV bytes vs dense and wall time of dual-cache generation on passkey prompts."""
    prompts, keys = passkey_prompts(context, cfg.eval_examples, seed=12345, tokenizer=tokenizer)
    new = 5 if tokenizer is None else 8
    max_len = max(map(len, prompts)) + new
    kw = (dict(decode_simulation=cfg.decode_simulation) if protocol == "longbench"
          else dict(chunk_size=cfg.chunk_size))
    hits, t0 = [], time.time()
    for s in range(0, len(prompts), cfg.eval_batch):
        out = da.generate(model, prompts[s: s + cfg.eval_batch], new, retrieval_heads=mask, sink=cfg.sink,
                          recent=cfg.recent, protocol=protocol, max_len=max_len, **kw)
        hits.append(key_matches(out.tokens, keys[s: s + cfg.eval_batch], tokenizer))
    return {"exact match": float(np.concatenate(hits).mean()), "KV bytes / dense": out.kv_nbytes / out.dense_kv_nbytes,
            "formula r+(1-r)(S+R)/L": da.kv_cache_ratio(mask.mean(), cfg.sink, cfg.recent, max_len),
            "s / example": (time.time() - t0) / len(prompts)}


@register("duo_attention_passkey", Config, presets={
    # 256: the context the smoke llama_passkey was trained at (exact match 1.0, 0.26-0.72 at 512); both keys lie
    # outside sink 16 + recent 64 at every needle depth below 0.95; 64-token prefill chunks so that only the first
    # quarter of the prompt is prefilled densely ("niah"), as 32K chunks are of the official 128K+ contexts
    "smoke": dict(steps=60, eval_examples=20, eval_batch=20, random_trials=2, eval_contexts=(256,), chunk_size=64),
    # LongBench's one dense forward over 32K+ tokens needs a fused attention the dense path lacks: not in full.
    "full": dict(require_model=True, sink=64, recent=256, eval_contexts=(32768, 65536, 131072), eval_examples=10,
                 eval_batch=1, random_trials=1, chunk_size=1024, dtype="bfloat16", protocols=("niah", "efficiency")),
})
def run(cfg: Config, run: Run) -> None:
    """Identify retrieval heads (or load a pattern), plot alpha, evaluate top-r / random / all-streaming."""
    model_dir, model_note = resolve_model(cfg.model, run)
    model = from_pretrained(model_dir, dtype=jnp.dtype(cfg.dtype))
    mc = model.config
    tokenizer = None if mc.vocab_size == PasskeyTask().tokenizer.vocab_size else load_tokenizer(model_dir)

    if cfg.pattern:
        alpha, sink, recent = da.load_pattern(cfg.pattern)
        da.check_pattern(alpha, mc.num_hidden_layers, mc.num_key_value_heads)
        source = f"pattern `{cfg.pattern}` (trained with sink {sink} / recent {recent})"
    else:
        gcfg = da.GateTrainConfig(sink=cfg.sink, recent=cfg.recent, steps=cfg.steps, lr=cfg.lr,
                                  reg_weight=cfg.reg_weight, streaming_mask=cfg.streaming_mask,
                                  mask_block=cfg.mask_block, gate_dtype=cfg.gate_dtype)
        if tokenizer is None:
            batches, data_note = _passkey_batches(cfg), f"`PasskeyTask` at context {cfg.train_context}"
            batch = cfg.batch_size
        else:  # the official calibration recipe, batch 1 (as the official run)
            data = da.MultiPasskeyData(tokenizer, config=da.CalibrationConfig(
                context_min=cfg.calib_context_min, context_max=cfg.calib_context_max))
            batches, batch = data.batches(cfg.seed), 1
            data_note = f"the official multi-passkey recipe at {cfg.calib_context_min}-{cfg.calib_context_max} tokens"
        t0 = time.time()
        alpha = da.train_gates(model, batches, gcfg, log=lambda s, m: run.log(s, **m),
                               progress=lambda r: run.progress(r, desc="gates"), mesh=run.mesh if batch > 1 else None)
        train_s = time.time() - t0
        if run.is_main:
            da.save_pattern(run.dir / "pattern", alpha, cfg.sink, cfg.recent, lr=cfg.lr, num_steps=cfg.steps,
                            reg_weight=cfg.reg_weight, context_length=cfg.train_context, batch_size=batch,
                            model_name=model_dir, model_run=(passkey_stamp(model_dir) or {}).get("run"),
                            streaming_attn_implementation=(
                                "blocksparse" if cfg.streaming_mask == "block" else "sdpa"),
                            mask_block=cfg.mask_block)
        mask_note = (f"{cfg.mask_block}-token block mask" if cfg.streaming_mask == "block" else "token-exact mask")
        source = f"gates trained {cfg.steps} steps x batch {batch} on {data_note} with the {mask_note} " \
                 f"in {train_s:.0f} s; pattern saved to `{run.dir / 'pattern'}`"
    _plot_alpha(run, np.clip(alpha, 0, 1))

    top = da.select_retrieval_heads(alpha, cfg.sparsity, seed=cfg.selection_seed)
    ties = da.selection_ties(alpha, top)
    tie_note = (f"{ties['tied']} heads tied at alpha {ties['boundary']:.4g} for {ties['kept']} retrieval slots, "
                f"chosen by the seed-{cfg.selection_seed} noise" if ties["noise_decided"]
                else "no ties in the selection")
    r = int(top.sum())
    # Random controls: distinct r-head subsets other than the top one.
    rng = np.random.default_rng(cfg.seed + 1)
    trials = min(cfg.random_trials, math.comb(alpha.size, r) - 1)
    seen, controls = {tuple(np.flatnonzero(top))}, []
    while len(controls) < trials:
        pick = tuple(sorted(rng.choice(alpha.size, r, replace=False).tolist()))
        if pick not in seen:
            seen.add(pick)
            controls.append(np.isin(np.arange(alpha.size), pick).reshape(alpha.shape))
    configs = [("dense (all retrieval)", np.ones_like(top)), (f"top-{r} retrieval", top)]
    configs += [(f"random {r} #{i + 1}", m) for i, m in enumerate(controls)]
    configs += [("all streaming", np.zeros_like(top))]

    rows = []
    for context in cfg.eval_contexts:
        for protocol in cfg.protocols:
            for name, mask in run.progress(configs, desc=f"eval {context} {protocol}"):
                res = evaluate(model, mask, cfg, context, protocol, tokenizer)
                streamed = " ".join(f"L{i}H{j}" for i, j in np.argwhere(~mask)) if mask.size <= 16 else ""
                rows.append({"context": context, "protocol": protocol, "heads": name,
                             "retrieval heads": int(mask.sum()), "streaming (layer, KV head)": streamed or "-", **res})
                run.log(len(rows), context=context, protocol=protocol, heads=name, exact_match=res["exact match"])
    run.results(rows, title="Passkey exact match with the dual KV cache",
                note=f"{model_note}; {source}. Sink {cfg.sink}, recent {cfg.recent}, sparsity {cfg.sparsity} "
                     f"({tie_note}); protocols: niah = prefill chunks of {cfg.chunk_size} tokens (first dense), "
                     f"longbench = one dense prefill + {cfg.decode_simulation} simulated decode steps, efficiency = "
                     f"token-exact window from the first chunk; {cfg.eval_examples} examples per cell, greedy. "
                     f"L in the formula is the cache length (prompt + generated tokens); s / example includes "
                     f"compilation. Ran on {jax.devices()[0].device_kind}.")
    run.save_json("alpha.json", {"alpha": alpha.tolist(), "top": top.tolist(), "ties": ties})


def _passkey_batches(cfg: Config):
    """Global `PasskeyTask` batches, the same on every process (seeded), answer tokens masked."""
    task = PasskeyTask(context=cfg.train_context)
    rng = np.random.default_rng(cfg.seed)
    while True:
        b = task.batch(cfg.seed, rng.integers(0, 2**31, cfg.batch_size))
        yield {"tokens": b["tokens"], "mask": answer_mask(b["tokens"], task.key_digits)}


def _plot_alpha(run: Run, alpha: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * alpha.shape[1], 1.0 + 0.35 * alpha.shape[0]))
    im = ax.imshow(alpha, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    if alpha.size <= 64:
        for (i, j), a in np.ndenumerate(alpha):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", color="w" if a < 0.5 else "k", fontsize=8)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title("DuoAttention gate alpha")
    fig.colorbar(im, ax=ax)
    run.savefig(fig, "alpha.png")
