"""duo_attention_passkey: identify retrieval heads of the llama_passkey model, then deploy them with the dual cache.

Gates are trained with the official two-way distillation on passkey examples (model frozen); the pattern is saved
in the official format (`<run>/pattern/`) and plotted. Deployment (dual KV cache, chunked prefill, greedy
decoding of the key) is evaluated at longer contexts with the top-r heads as retrieval heads, r random heads
(subsets other than the top one) and no retrieval heads at all; KV-cache bytes are measured on the cache and
compared with r + (1 - r)(sink + recent)/L.

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
    resolve_model,
)
from jaxeff.experiment import Run, register
from jaxeff.io import from_pretrained


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = ""  # HF-format directory; default: the llama_passkey export (trained first if there is none)
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
    chunk_size: int = 256
    dtype: str = "float32"
    require_model: bool = False  # the full preset: model= and pattern= must be given

    def validate(self):
        check_model_and_pattern(self.model, self.pattern, self.require_model)
        if not 0 < self.sparsity < 1:
            raise ValueError("sparsity must be in (0, 1)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("dtype must be float32 or bfloat16")
        PasskeyTask(context=self.train_context)


def answer_mask(tokens: np.ndarray, key_digits: int) -> np.ndarray:
    """Question + key tokens (the official labels are the QA tokens)."""
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, tokens.shape[1] - key_digits - len(QUESTION): tokens.shape[1] - 1] = 1.0
    return mask


def evaluate(model, mask, cfg: Config, context: int, tokenizer=None) -> dict:
    """Exact match, KV bytes vs dense and wall time of dual-cache generation on passkey prompts."""
    prompts, keys = passkey_prompts(context, cfg.eval_examples, seed=12345, tokenizer=tokenizer)
    new = 5 if tokenizer is None else 8
    max_len = max(map(len, prompts)) + new
    hits, t0 = [], time.time()
    for s in range(0, len(prompts), cfg.eval_batch):
        out = da.generate(model, prompts[s: s + cfg.eval_batch], new, retrieval_heads=mask, sink=cfg.sink,
                          recent=cfg.recent, chunk_size=cfg.chunk_size, max_len=max_len)
        hits.append(key_matches(out.tokens, keys[s: s + cfg.eval_batch], tokenizer))
    return {"exact match": float(np.concatenate(hits).mean()), "KV bytes / dense": out.kv_nbytes / out.dense_kv_nbytes,
            "formula r+(1-r)(S+R)/L": da.kv_cache_ratio(mask.mean(), cfg.sink, cfg.recent, max_len),
            "s / example": (time.time() - t0) / len(prompts)}


@register("duo_attention_passkey", Config, presets={
    "smoke": dict(steps=60, eval_examples=20, eval_batch=20, random_trials=2, eval_contexts=(512,)),
    "full": dict(require_model=True, sink=64, recent=256, eval_contexts=(32768, 65536, 131072), eval_examples=10,
                 eval_batch=1, random_trials=1, chunk_size=1024, dtype="bfloat16"),
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
        if tokenizer is not None:
            raise ValueError("gate training here uses the character passkey task; pass pattern= for a real model")
        task = PasskeyTask(context=cfg.train_context)
        rng = np.random.default_rng(cfg.seed)

        def batches():
            while True:
                b = task.batch(cfg.seed, rng.integers(0, 2**31, cfg.batch_size))
                yield {"tokens": b["tokens"], "mask": answer_mask(b["tokens"], task.key_digits)}

        gcfg = da.GateTrainConfig(sink=cfg.sink, recent=cfg.recent, steps=cfg.steps, lr=cfg.lr,
                                  reg_weight=cfg.reg_weight)
        t0 = time.time()
        alpha = da.train_gates(model, batches(), gcfg, log=lambda s, m: run.log(s, **m),
                               progress=lambda r: run.progress(r, desc="gates"))
        train_s = time.time() - t0
        da.save_pattern(run.dir / "pattern", alpha, cfg.sink, cfg.recent, lr=cfg.lr, num_steps=cfg.steps,
                        reg_weight=cfg.reg_weight, context_length=cfg.train_context, batch_size=cfg.batch_size,
                        model_name=model_dir)
        source = f"gates trained {cfg.steps} steps x batch {cfg.batch_size} at context {cfg.train_context} " \
                 f"in {train_s:.0f} s; pattern saved to `{run.dir / 'pattern'}`"
    _plot_alpha(run, alpha)

    top = da.select_retrieval_heads(alpha, cfg.sparsity)
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
        for name, mask in run.progress(configs, desc=f"eval {context}"):
            res = evaluate(model, mask, cfg, context, tokenizer)
            streamed = " ".join(f"L{i}H{j}" for i, j in np.argwhere(~mask)) if mask.size <= 16 else ""
            rows.append({"context": context, "heads": name, "retrieval heads": int(mask.sum()),
                         "streaming (layer, KV head)": streamed or "-", **res})
            run.log(len(rows), context=context, heads=name, exact_match=res["exact match"])
    run.results(rows, title="Passkey exact match with the dual KV cache",
                note=f"{model_note}; {source}. Sink {cfg.sink}, recent {cfg.recent}, sparsity {cfg.sparsity}, "
                     f"chunked prefill of {cfg.chunk_size} tokens, {cfg.eval_examples} examples per cell, greedy. "
                     f"L in the formula is the cache length (prompt + generated tokens); s / example includes "
                     f"compilation. Ran on {jax.devices()[0].device_kind}.")
    run.save_json("alpha.json", {"alpha": alpha.tolist(), "top": top.tolist()})


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
