"""make bench name=duo_attention: DuoAttention's headline effects as ratios, the engine vs itself dense, one run.

The paper (reference note "Headline numbers", A100-80G, README/paper figures): MHA with 25% retrieval heads (Llama-2-
7B-32K) reduces memory up to 2.55x, speeds decode up to 2.18x and prefill up to 1.73x (100K tokens); GQA with 50%
(Llama-3-8B-1048k) up to 1.67x, 1.50x and 1.63x (320K tokens). Per setting (`mha=1`, `gqa=1`):
1. Memory: the K/V bytes of `jaxeff.duo_attention.DualKVCache` (full buffers for retrieval heads, sink + recent for
   streaming ones) vs a dense cache of the same length, at the paper's model shapes and context range with the
   released pattern (Llama-2-7B-32K at sparsity 0.75, Llama-3-8B-1048k at 0.5; random gates when absent), sink 128 /
   recent 256, bfloat16. The cache shapes come from `DualKVCache.init` under `jax.eval_shape` (nothing allocated, so
   every preset prints it), next to the paper's formula r + (1 - r)(S + R)/L and to (weights + KV) dense / (weights
   + KV) duo, the weights' bytes from the model's parameter shapes.
2. Decode sweep (the paper's sweep at a fixed context): at `decode_context` tokens, ms per generated token of
   `jaxeff.duo_attention.generate` with retrieval-head ratio r in (0, 0.25, 0.5, 0.75, 1), heads chosen by the
   quantile rule from the gates above (the preset's model; smoke: random gates); speed-up = r = 1 (dense) / r.
   The cache has decode_context + new_tokens slots but the prompt is one chunk: the decode loop is the same compiled
   program whatever the prompt length (its shapes depend on the cache length only) and attends every slot of the
   retrieval buffers (position-masked) and the whole sink + recent ring, so a step costs what it costs after a
   decode_context-token prompt, while generate(1) (subtracted) stays short and its timing noise small.
3. Prefill vs context: prompt seconds with the official chunked prefill (window "official": the first chunk dense
   for every head, later chunks' streaming heads see [sink + recent; chunk]) in `chunk`-token chunks, at the
   setting's ratio vs the same engine with every head a retrieval head.
Timings: random weights, batch 1, a random prompt, greedy with no stop; after a compile + warm-up call, best of
`repeats`; decode per token = (generate(new_tokens) - generate(1)) / (new_tokens - 1) (`serving.time_split`: nan when
within the noise of generate(1)). KV x columns are measured from the cache the run built (`kv_nbytes`).

Cost model behind the ratios (so read them with it): retrieval heads attend their whole max_len buffer under a
position mask (XLA attention; O(chunk x max_len) per prefill chunk and O(max_len) per decode step) and streaming
heads [sink + recent; chunk] (O(chunk x (sink + recent + chunk))). The official dense baseline is a flash kernel over
the filled prefix (O(chunk x offset)), so this dense prefill costs up to ~2x the official one and the prefill
speed-ups here are upper bounds for the official comparison; decode reads are the same as the official ones.

Presets: `smoke` (default): a 2-layer, 256-wide model (MHA 8 KV heads, GQA 8 q / 2 KV heads), float32, sink 16 /
recent 64, chunks of 256, contexts 1K-4K; on a CPU the timings are ratios of a tiny model, not the paper's scale
(the memory table is at the paper's shapes in every preset). `full`: Llama-2-7B-32K-shaped MHA (rope scaling
omitted: random weights) and Llama-3-8B GQA, bfloat16, sink 128 / recent 256, 1024-token chunks (the official
32K chunks need [heads, chunk, max_len] scores in this XLA path), contexts 16K-96K (MHA) / 32K-128K (GQA): a GPU
with >= 80 GB. `full` has not run (no GPU in the session that wrote it).
Overrides: key=<int> for the preset's integer options (`mha=0` / `gqa=0` skip a setting, `context=N` one prefill
context, `decode_context`, `chunk`, `sink`, `recent`, `new_tokens`, `repeats`), e.g.
`python -m benchmarks.duo_attention preset=full gqa=0 context=32768`.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import best_time
from benchmarks.serving import (
    LLAMA3_8B,
    RELEASED,
    build_model,
    duo_generator,
    fmt_table,
    gate_values,
    model_config,
    parse_args,
    ratios,
    time_split,
)
from jaxeff import duo_attention as da
from jaxeff.models.llama import Llama

LLAMA2_7B_32K = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5)
# Per setting: the paper's retrieval ratio, model shape, released pattern, memory contexts and headline figures.
SETTINGS = {
    "MHA": dict(ratio=0.25, shape=LLAMA2_7B_32K, pattern="Llama-2-7B-32K-Instruct",
                memory_contexts=(20000, 50000, 100000, 200000), paper="memory 2.55x, decode 2.18x, prefill 1.73x"),
    "GQA": dict(ratio=0.5, shape=LLAMA3_8B, pattern="Llama-3-8B-Instruct-Gradient-1048k",
                memory_contexts=(100000, 320000, 1000000), paper="memory 1.67x, decode 1.50x, prefill 1.63x"),
}
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8)
PRESETS = {
    "smoke": dict(mha=1, gqa=1, paper_shape=0, mha_kv_heads=8, gqa_kv_heads=2, mha_contexts=(1024, 2048, 4096),
                  gqa_contexts=(1024, 2048, 4096), context=0, decode_context=4096, chunk=256, sink=16, recent=64,
                  new_tokens=256, repeats=3, bf16=0),
    "full": dict(mha=1, gqa=1, paper_shape=1, mha_contexts=(16384, 32768, 65536, 98304),
                 gqa_contexts=(32768, 65536, 131072), context=0, decode_context=65536, chunk=1024, sink=128, recent=256,
                 new_tokens=128, repeats=1, bf16=1),
}
RATIO_SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)
PAPER_SINK, PAPER_RECENT = 128, 256  # every released pattern's config.json


def param_nbytes(model) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def memory_table(setting: str) -> list[dict]:
    """KV and (weights + KV) bytes, dense vs DualKVCache, at the paper's shape, pattern and contexts (bfloat16),
    from the shapes `jax.eval_shape` gives: nothing is allocated."""
    spec = SETTINGS[setting]
    mc = model_config(spec["shape"])
    alpha, source = gate_values(mc, "", RELEASED.parent / spec["pattern"])
    gates = spec["pattern"] if source.startswith("pattern") else "random"
    heads = da.select_retrieval_heads(alpha, 1 - spec["ratio"])
    weights = param_nbytes(nnx.eval_shape(lambda: Llama(mc, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                        param_dtype=jnp.bfloat16)))
    rows = []
    for ctx in spec["memory_contexts"]:
        cache = jax.eval_shape(lambda c=ctx: da.DualKVCache.init(heads, 1, c, mc.head_dim, sink=PAPER_SINK,
                                                                 recent=PAPER_RECENT, dtype=jnp.bfloat16))
        kv, dense = cache.kv_nbytes(), cache.dense_kv_nbytes()
        r = heads.mean()
        rows.append({"setting": setting, "gates": gates, "context": ctx,
                     "retrieval": f"{int(heads.sum())}/{heads.size}",
                     "dense KV GiB": dense / 2**30, "duo KV GiB": kv / 2**30, "KV x": dense / kv,
                     "KV x formula": 1 / da.kv_cache_ratio(r, PAPER_SINK, PAPER_RECENT, ctx),
                     "weights GiB": weights / 2**30, "weights+KV x": (weights + dense) / (weights + kv)})
    return rows


def run_setting(setting: str, opts: dict, preset: str, rng) -> tuple[list[dict], list[dict]]:
    """(decode sweep rows, prefill rows) of one setting on the preset's model."""
    spec = SETTINGS[setting]
    kv_heads = opts.get(f"{setting.lower()}_kv_heads")
    shape = spec["shape"] if opts["paper_shape"] else dict(TINY, num_key_value_heads=kv_heads)
    n, repeats, sink, recent, chunk = (opts[k] for k in ("new_tokens", "repeats", "sink", "recent", "chunk"))
    model = build_model({**opts, **shape}, preset, f"; {setting}")
    mc = model.config
    alpha, source = gate_values(mc, "", RELEASED.parent / spec["pattern"])
    print(f"{setting}: {source}; sink {sink}, recent {recent}, chunks of {chunk}, {n} new tokens, best of {repeats}")
    kw = dict(sink=sink, recent=recent, chunk=chunk)

    ctx = opts["decode_context"]
    prompt = rng.integers(0, mc.vocab_size, min(chunk, ctx)).tolist()  # one chunk; the cache holds ctx + n slots
    sweep = []
    for r in RATIO_SWEEP:
        heads = da.select_retrieval_heads(alpha, 1 - r)
        res = time_split(duo_generator(model, heads, prompt, ctx + n, **kw), n, repeats)
        sweep.append({"setting": setting, "context": ctx, "retrieval ratio": r,
                      "retrieval": f"{int(heads.sum())}/{heads.size}", "decode ms/token": res["decode ms/token"],
                      "KV GiB": res["KV GiB"],
                      "KV x formula": 1 / da.kv_cache_ratio(heads.mean(), sink, recent, ctx + n)})
        print(f"  decode sweep r={r}: done", flush=True)
    for row in sweep:
        row.update(ratios(row, sweep[-1], " vs dense"))

    heads = da.select_retrieval_heads(alpha, 1 - spec["ratio"])
    contexts = (opts["context"],) if opts["context"] else opts[f"{setting.lower()}_contexts"]
    prefill = []
    for ctx in contexts:
        prompt = rng.integers(0, mc.vocab_size, ctx).tolist()
        res = {}
        for name, h in (("duo", heads), ("dense", np.ones_like(heads))):
            gen = duo_generator(model, h, prompt, ctx + 1, **kw)
            res[name] = {"prefill s": best_time(gen, 1, repeats=repeats), "KV GiB": gen(1) / 2**30}
        prefill.append({"setting": setting, "context": ctx, "retrieval": f"{int(heads.sum())}/{heads.size}",
                        "duo prefill s": res["duo"]["prefill s"], "dense prefill s": res["dense"]["prefill s"],
                        **ratios(res["duo"], res["dense"], " vs dense"),
                        "KV x formula": 1 / da.kv_cache_ratio(heads.mean(), sink, recent, ctx + 1)})
        print(f"  prefill context {ctx}: done", flush=True)
    return sweep, prefill


def main(argv):
    preset, opts, _ = parse_args(argv, PRESETS, __doc__, pattern=False)
    if opts["new_tokens"] < 2:
        raise SystemExit("new_tokens must be >= 2 (decode time per token)")
    settings = [s for s in SETTINGS if opts[s.lower()]]
    if not settings:
        raise SystemExit("nothing to run: mha=0 and gqa=0")
    print("DuoAttention, paper (A100, README/paper): " + "; ".join(f"{s} ({SETTINGS[s]['ratio']:.0%} retrieval): "
                                                                  f"{SETTINGS[s]['paper']}" for s in SETTINGS))
    if preset == "smoke":
        print("smoke preset: a tiny random model; timings are ratios on this machine, not the paper's scale")
    rng = np.random.default_rng(0)
    results = [run_setting(s, opts, preset, rng) for s in settings]
    print(f"\n1. Memory at the paper's shapes (bfloat16, batch 1, sink {PAPER_SINK} / recent {PAPER_RECENT}, "
          "gates: the released pattern's where present): cache bytes from DualKVCache.init under jax.eval_shape; "
          "KV x = dense / duo; formula = 1 / (r + (1 - r)(S + R)/L)")
    print(fmt_table([row for s in settings for row in memory_table(s)]))
    print("\n2. Decode sweep over the retrieval-head ratio (x vs dense = the r = 1 row's time or KV bytes / this "
          "row's; nan: decode within the timing noise)")
    print(fmt_table([row for sweep, _ in results for row in sweep]))
    print("\n3. Prefill vs context, official chunked prefill, at the setting's ratio (x vs dense = dense / duo)")
    print(fmt_table([row for _, prefill in results for row in prefill]))


if __name__ == "__main__":
    main(sys.argv[1:])
