"""lserve_needle: passkey (needle) retrieval with the LServe engine vs token budget and context length.

Static sparsity comes from a DuoAttention pattern (`pattern=` directory or `hf:`/`github:` name as
`jaxeff.duo_attention.load_pattern` takes, else the newest `duo_attention_passkey` pattern identified on the same
checkpoint (for a `llama_passkey` export: the same training run) under the same runs root, else heads identified
here with `jaxeff.duo_attention.train_gates`); dynamic sparsity is the page selection under a token budget. The
engine follows the official LServe rules (jaxeff/lserve/README.md): page lists per query head, reselection when the
history length is a multiple of `reselect_every` and at the first decode step, min(max(3, budget // page), pages)
pages per list; prefill with the streaming heads on their prefill window (`sparse_prefill`, on as in every LServe
script) and decode with the decode window. For every context: dense decoding (every head reads every page), every
head streaming (StreamingLLM: no retrieval heads), streaming heads only (the pattern's retrieval heads dense),
streaming heads + page selection per budget, and the largest budget with one page list per KV head (the shared-list
ablation). Reported: exact match of the greedy key, KV bytes read per decode step relative to dense (distinct pages
per KV head + min/max statistics), and prefill / decode wall-time ratios against the dense engine measured in the
same process after a warm-up call (CPU ratios; absolute times are not meaningful on a shared CPU). Files are written
by process 0 only (the runner's `Run` methods; the identified pattern under `run.is_main`).

Windows: smoke/default scale the official ones down with the contexts (decode sink 16 + local 64, prefill sink 16
+ local 256: a quarter of a 1K context, as 8192 is of 32K; smoke, at 256 tokens: prefill local 64); `full` uses the
official sink 128 + local 256 in decode and 128 + 8192 in prefill, pages of 64 / 16 and the 4096-token budget.

`full` preset: `model=/path/to/Llama-3-8B-Instruct-Gradient-1048k pattern=/path/to/duo_attn_pattern` at 32K-128K
tokens (GPU/TPU).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff import duo_attention as da
from jaxeff.data import PasskeyTask
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
from jaxeff.lserve import Engine, LServeConfig


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = ""  # default: the shared llama_passkey export (resolve_model; trained first if there is none)
    pattern: str = ""  # dir or hf:/github: name; default: the newest duo_attention_passkey pattern of this model
    # (same runs root), else identified here
    sparsity: float = 0.5
    identify_steps: int = 100
    sink: int = 16  # decode window of the streaming heads
    local: int = 64
    prefill_sink: int = 16  # prefill window of the streaming heads
    prefill_local: int = 256
    sparse_prefill: bool = True  # every LServe script passes --sparse-context-mode
    page_size: int = 16
    logical_page_size: int = 4
    budgets: tuple[int, ...] = (48, 64, 128)  # tokens; at least 3 pages
    reselect_every: int = 4
    contexts: tuple[int, ...] = (256, 512, 1024)
    prefill_chunk: int = 256
    eval_examples: int = 50
    eval_batch: int = 25
    timing_tokens: int = 64  # decode steps of the timed generation
    dtype: str = "float32"
    require_model: bool = False

    def validate(self):
        check_model_and_pattern(self.model, self.pattern, self.require_model)
        for b in self.budgets:  # raises on a budget below 3 pages or not a multiple of the page
            LServeConfig(page_size=self.page_size, logical_page_size=self.logical_page_size, token_budget=b,
                         reselect_every=self.reselect_every)
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("dtype must be float32 or bfloat16")


def find_pattern(cfg: Config, model, model_dir: str, run: Run) -> tuple[np.ndarray, str]:
    if cfg.pattern:
        alpha, _, _ = da.load_pattern(cfg.pattern)
        return alpha, f"pattern `{cfg.pattern}`"
    # only a pattern identified on this very checkpoint: another model's with the same head count would load
    # without complaint and name the wrong heads; a llama_passkey export is also told apart from an earlier one at
    # the same path by the training run in its stamp
    made_by = (passkey_stamp(model_dir) or {}).get("run")
    found = sorted((run.dir.parent.parent / "duo_attention_passkey").glob("*/pattern/config.json"))
    for meta in reversed(found):
        info = json.loads(meta.read_text())
        if (Path(info.get("model_name", "")).resolve() == Path(model_dir).resolve()
                and info.get("model_run") == made_by):
            alpha, _, _ = da.load_pattern(meta.parent)
            return alpha, f"pattern `{meta.parent}`"
    task = PasskeyTask()
    rng = np.random.default_rng(0)

    def batches():
        while True:
            b = task.batch(0, rng.integers(0, 2**31, 8))
            mask = np.zeros(b["tokens"].shape, np.float32)
            mask[:, -40:-1] = 1.0  # question + key
            yield {"tokens": b["tokens"], "mask": mask}

    alpha = da.train_gates(model, batches(), da.GateTrainConfig(sink=cfg.sink, recent=cfg.local,
                                                                steps=cfg.identify_steps,
                                                                # the official 128-token blocks scaled to the
                                                                # 16-token sink, as duo_attention_passkey does
                                                                mask_block=max(1, cfg.sink)),
                           progress=lambda r: run.progress(r, desc="identify heads"))
    if run.is_main:
        da.save_pattern(run.dir / "pattern", alpha, cfg.sink, cfg.local, num_steps=cfg.identify_steps)
    return alpha, f"heads identified here ({cfg.identify_steps} steps), pattern `{run.dir / 'pattern'}`"


def evaluate(engine: Engine, prompts, keys, batch: int, tokenizer, new_tokens: int, timing_tokens: int) -> dict:
    """Accuracy and bytes over all prompts; then prefill / decode wall time of one batch generating `timing_tokens`
    tokens (after a warm-up call; the faster of two timed calls)."""
    hits, stats = [], []
    for s in range(0, len(prompts), batch):
        out = engine.generate(prompts[s: s + batch], new_tokens)
        hits.append(key_matches(out.tokens, keys[s: s + batch], tokenizer))
        stats += out.stats
    read = np.mean([st["kv_bytes_per_step"] / st["dense_kv_bytes_per_step"] for st in stats])
    timed = [engine.generate(prompts[:batch], timing_tokens).stats[0] for _ in range(3)][1:]
    return {"exact match": float(np.concatenate(hits).mean()), "KV bytes read / dense": float(read),
            "prefill_s": min(t["prefill_s"] for t in timed), "decode_s": min(t["decode_s"] for t in timed)}


@register("lserve_needle", Config, presets={
    # 256: the context the smoke llama_passkey was trained at (1.0 there, 0.26-0.72 at 512); prefill local 64: a quarter
    # of it, as the default's 256 is of 1K and the official 8192 of 32K
    "smoke": dict(contexts=(256,), prefill_local=64, budgets=(48, 64), eval_examples=20, eval_batch=20,
                  identify_steps=40, timing_tokens=16),
    "full": dict(require_model=True, sink=128, local=256, prefill_sink=128, prefill_local=8192, page_size=64,
                 logical_page_size=16, budgets=(4096,), contexts=(32768, 65536, 131072), prefill_chunk=32000,
                 eval_examples=10, eval_batch=1, dtype="bfloat16"),
})
def run(cfg: Config, run: Run) -> None:
    """Needle accuracy, bytes read and time ratios of LServe vs dense decoding."""
    model_dir, model_note = resolve_model(cfg.model, run)
    model = from_pretrained(model_dir, dtype=jnp.dtype(cfg.dtype))
    mc = model.config
    tokenizer = None if mc.vocab_size == PasskeyTask().tokenizer.vocab_size else load_tokenizer(model_dir)
    alpha, source = find_pattern(cfg, model, model_dir, run)
    da.check_pattern(alpha, mc.num_hidden_layers, mc.num_key_value_heads)
    retrieval = da.select_retrieval_heads(alpha, cfg.sparsity)
    new_tokens = 5 if tokenizer is None else 8

    rows = []
    for context in cfg.contexts:
        prompts, keys = passkey_prompts(context, cfg.eval_examples, seed=777, tokenizer=tokenizer)
        max_len = max(map(len, prompts)) + max(new_tokens, cfg.timing_tokens)
        base = LServeConfig(max_len=max_len, page_size=cfg.page_size, logical_page_size=cfg.logical_page_size,
                            token_budget=max(cfg.budgets), reselect_every=cfg.reselect_every, sink=cfg.sink,
                            local=cfg.local, prefill_sink=cfg.prefill_sink, prefill_local=cfg.prefill_local,
                            sparse_prefill=cfg.sparse_prefill, prefill_chunk=cfg.prefill_chunk)
        static = dataclasses.replace(base, dynamic_sparsity=False)
        # the StreamingLLM baseline (every head on the window) shows what the retrieval heads are for
        variants = [("dense", None, static, np.ones_like(retrieval)),
                    ("every head streaming", None, static, np.zeros_like(retrieval)),
                    ("streaming heads only", None, static, retrieval)]
        variants += [("streaming + page selection", b, dataclasses.replace(base, token_budget=b), retrieval)
                     for b in cfg.budgets]
        variants.append(("streaming + page selection, one list per KV head", max(cfg.budgets),
                         dataclasses.replace(base, per_query_head=False), retrieval))
        dense = None
        for name, budget, lcfg, heads in run.progress(variants, desc=f"context {context}"):
            engine = Engine(model, lcfg, retrieval_heads=heads)
            res = evaluate(engine, prompts, keys, cfg.eval_batch, tokenizer, new_tokens, cfg.timing_tokens)
            dense = dense or res
            rows.append({"context": context, "mode": name, "budget": budget, "exact match": res["exact match"],
                         "KV bytes read / dense": res["KV bytes read / dense"],
                         "prefill time / dense": res["prefill_s"] / dense["prefill_s"],
                         "decode time / dense": res["decode_s"] / dense["decode_s"]})
            run.log(len(rows), **{k.replace(" ", "_").replace("/", "per"): v for k, v in rows[-1].items()})
    run.results(rows, title="LServe needle retrieval vs token budget and context",
                note=f"{model_note}; {source}; sparsity {cfg.sparsity} "
                     f"({int((~retrieval).sum())}/{retrieval.size} KV heads streaming), decode window sink "
                     f"{cfg.sink} + local {cfg.local}, prefill window {cfg.prefill_sink} + {cfg.prefill_local} "
                     f"({'sparse' if cfg.sparse_prefill else 'dense'} prefill), pages {cfg.page_size}/"
                     f"{cfg.logical_page_size} tokens, page lists per query head (unless said), reselected when "
                     f"the history length % {cfg.reselect_every} == 0 and at the first decode step, prefill chunk "
                     f"{cfg.prefill_chunk}; {cfg.eval_examples} examples, greedy key. KV bytes read per decode step: "
                     f"distinct pages per KV head + the min/max statistics. Times: one batch "
                     f"generating {cfg.timing_tokens} tokens, wall clock after warm-up (best of 2) on "
                     f"{jax.devices()[0].device_kind}, as ratios to the dense engine.")
