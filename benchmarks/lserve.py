"""make bench name=lserve: LServe's sparsity speed-ups as ratios, the engine vs itself dense, one device, one run.

The paper (reference note "Reported results", README/paper, A100 / L40S): against vLLM, prefill up to 2.9x and
decode 1.3-2.1x faster; those runs use QServe's W8A8 / KV8 kernels, so they mix quantization with sparsity. Here
the precision is the same on both sides (bfloat16 in `full`) and only the sparsity differs: `jaxeff.lserve.Engine`
with the DuoAttention pattern's streaming heads (static sparsity 0.5, as every LServe script) and page selection per
query head under a token budget (dynamic sparsity), vs the same engine with every head a retrieval head and no page
selection (reads every page). Settings as the official benchmark scripts (`serving.lserve_config`: sparse prefill,
prefill sink + local window, decode sink + local window, physical / logical pages, reselection every 4 steps).
1. Context sweep at the preset's `budget`: prefill seconds, decode ms per token, KV pages read per decode step (one
   KV head's page; distinct pages of a GQA group counted once), KV MiB read per step (pages + the key statistics
   the selector reads), KV GiB held; ratios dense / LServe.
2. Budget sweep at one context (`budget_context`, 0 = the largest context run): decode ms per token, pages and MiB
   read per step against the dense engine at that context, and the static sparsity alone ("static only": streaming
   heads, every retrieval page read).
Timings: random weights, batch 1, a random prompt, greedy `new_tokens` tokens with no stop; the engine's own split
(prefill = prompt to first token, decode = the compiled decode loop), after a compile + warm-up call, best of
`repeats` (`serving.time_lserve`). Pages and bytes read are counted by the engine (`LServeOutput.stats`).

The pattern: `pattern=<dir>`, else the released Llama-3-8B-Instruct-Gradient-1048k pattern under
../shared/data/duo_attention_patterns when present and of the model's shape, else random gates; the quantile rule at
sparsity 0.5 (`serving.retrieval_pattern`).

Presets: `smoke` (default): the serving benchmark's tiny model (2 layers, 256 wide, 8 q / 2 KV heads), float32,
16-token pages, 256-token budget, contexts 1K-4K, budgets 64-1024; on a CPU (XLA paths) the timings are ratios of a
tiny model, not the paper's scale. `full`: Llama-3-8B, bfloat16, the official windows and 64-token pages, budget
4096, contexts 32K-256K, budgets 1K-8K: a GPU with >= 80 GB; one context per call, e.g. `python -m benchmarks.lserve
preset=full context=65536`. `full` has not run (no GPU in the session that wrote it).
Overrides: key=<int> for the preset's integer options (`context=N` runs one context, `budget`, `budget_context`,
`new_tokens`, `repeats`, page and window sizes), and `pattern=<dir>`.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from benchmarks import serving
from benchmarks.serving import (
    RATIOS,
    build_model,
    fmt_table,
    lserve_config,
    parse_args,
    ratios,
    retrieval_pattern,
    time_lserve,
)

# The serving benchmark's LServe settings and models, with longer contexts and decodes and the budgets to sweep.
PRESETS = {
    name: {k: v for k, v in serving.PRESETS[name].items() if not k.startswith("duo") and k != "transformers"} | extra
    for name, extra in (
        ("smoke", dict(contexts=(1024, 2048, 4096), budgets=(64, 128, 256, 512, 1024), budget_context=0,
                       new_tokens=32)),
        ("full", dict(budgets=(1024, 2048, 4096, 8192), budget_context=0)),
    )
}
READ = RATIOS | {"pages read x": "pages read/step", "KV read x": "KV MiB read/step"}
BUDGET_RATIOS = ("decode x", "pages read x", "KV read x")


def timed(label: str, *args) -> dict:
    """`time_lserve(*args)`, saying when it is done."""
    t0 = time.perf_counter()
    out = time_lserve(*args)
    print(f"  {label} done in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def main(argv):
    preset, opts, pattern = parse_args(argv, PRESETS, __doc__)
    contexts = (opts["context"],) if opts["context"] else opts["contexts"]
    n, repeats = opts["new_tokens"], opts["repeats"]
    if n < 2:
        raise SystemExit("new_tokens must be >= 2 (decode time per token)")
    print("LServe, paper (README/paper): vs vLLM prefill up to 2.9x, decode 1.3-2.1x, with W8A8/KV8 quantization mixed "
          "in; here the same engine and precision, sparsity alone")
    if preset == "smoke":
        print("smoke preset: a tiny random model; timings are ratios on this machine, not the paper's scale")
    model = build_model(opts, preset, f"; contexts {contexts}; {n} new tokens; best of {repeats}")
    retrieval, source = retrieval_pattern(model.config, pattern)
    streaming = ~retrieval
    print(f"{source}: {int(streaming.sum())}/{streaming.size} KV heads streaming; budget {opts['budget']} tokens, "
          f"pages {opts['page_size']} / {opts['logical_page_size']}")
    rng = np.random.default_rng(0)
    prompts = {ctx: rng.integers(0, model.config.vocab_size, ctx).tolist() for ctx in contexts}
    budget_ctx = opts["budget_context"] or max(contexts)
    if budget_ctx not in prompts:
        prompts[budget_ctx] = rng.integers(0, model.config.vocab_size, budget_ctx).tolist()

    dense, by_context = {}, []
    for ctx in prompts:
        base = lserve_config(opts, ctx, n)
        dense[ctx] = timed(f"context {ctx}: dense", model, dataclasses.replace(base, dynamic_sparsity=False), None,
                           prompts[ctx], n, repeats)
        if ctx not in contexts:
            continue
        res = timed(f"context {ctx}: lserve", model, base, streaming, prompts[ctx], n, repeats)
        for name, r in (("lserve", res), ("dense", dense[ctx])):
            row = {"context": ctx, "engine": name, **{k: v for k, v in r.items() if k != "total"}}
            by_context.append(row | (ratios(r, dense[ctx], keys=READ) if r is res else {}))

    by_budget = []
    base = lserve_config(opts, budget_ctx, n)
    runs = [(str(b), dataclasses.replace(base, token_budget=b)) for b in opts["budgets"]]
    for label, cfg in runs + [("static only", dataclasses.replace(base, dynamic_sparsity=False))]:
        r = timed(f"context {budget_ctx}, budget {label}", model, cfg, streaming, prompts[budget_ctx], n, repeats)
        keep = ("decode ms/token", "pages read/step", "KV MiB read/step")
        by_budget.append({"context": budget_ctx, "budget": label, **{k: r[k] for k in keep},
                          **ratios(r, dense[budget_ctx], keys={k: READ[k] for k in BUDGET_RATIOS})})

    print("\nx = the dense engine's time (or bytes) / LServe's; > 1 is faster (fewer). Pages: one KV head's page read "
          "by a decode step, summed over layers and heads; MiB read: those pages' K and V plus the min/max statistics "
          "the selector reads; KV GiB: the page pools held.")
    print(f"1. Context sweep (budget {opts['budget']} tokens)")
    print(fmt_table(by_context))
    print(f"\n2. Budget sweep at context {budget_ctx} (static only: streaming heads, every retrieval page read)")
    print(fmt_table(by_budget))


if __name__ == "__main__":
    main(sys.argv[1:])
