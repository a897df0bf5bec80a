"""make bench name=serving: end-to-end long-context serving, DuoAttention and LServe vs dense, one device, one run.

Random weights at the preset's size (`full`: Llama-3-8B, bfloat16), batch 1, a random prompt per context, greedy
generation of `new_tokens` tokens. Engines, side by side on the same device:
- `lserve`: `jaxeff.lserve.Engine` with the DuoAttention pattern's streaming heads (static sparsity `sparsity`),
  page selection per query head under `budget` tokens, windows and switches as the official LServe benchmark
  scripts (sparse prefill on, prefill sink 128 + local 8192, decode sink 128 + local 256, pages 64 / 16).
- `lserve dense`: the same engine with every head a retrieval head and no page selection (reads every page).
- `duo`: `jaxeff.duo_attention.generate` with the pattern (public API: streaming heads keep sink + recent).
- `duo dense`: the same with every head a retrieval head.
- `transformers`: `LlamaForCausalLM.generate` (PyTorch, SDPA attention) with random weights of the same size on the
  same device class (CUDA when jax runs on a GPU; skipped in `full` when torch has no CUDA, and when torch or
  transformers is not installed).
Measured per engine after a warm-up call (compiles), best of `repeats`: prefill seconds (the prompt up to the first
token), decode seconds per token ((time for new_tokens - time for 1 token) / (new_tokens - 1), for the engines
whose generate reports no split), and the K/V bytes the cache holds (allocated pools / buffers; transformers: 2 x
layers x KV heads x head_dim x tokens x itemsize). Ratios: dense time / engine time (speed-up) and dense KV / engine
KV, against the same engine dense and against transformers.

The pattern: `pattern=` directory (default: the released Llama-3-8B-Instruct-Gradient-1048k pattern under
../shared/data/duo_attention_patterns when present and of the model's shape), else a synthetic one: random gate
values, the quantile rule at `sparsity` (the released ratio: half the KV heads streaming).

Presets: `smoke` (default; tiny model, 1K-2K tokens, float32, CPU: timings are ratios only), `full` (Llama-3-8B,
32K-256K tokens, bfloat16: a GPU with >= 80 GB). Overrides: key=<int> for the preset's integer options (`context=N`
runs one context instead of the preset's list), and `pattern=<dir>`. Written for a lent GPU; the `full` preset has
not run yet (no GPU in the session that wrote it). At 256K tokens one context takes minutes per engine: on a lent
GPU run one context per call, e.g. `python -m benchmarks.serving preset=full context=32768`
(`scripts/gpu_serving.sh` runs the device checks, then one step per context).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to PyTorch's model too

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import parse_preset  # noqa: E402
from jaxeff import duo_attention as da  # noqa: E402
from jaxeff.lserve import Engine, LServeConfig  # noqa: E402
from jaxeff.models.llama import Llama, LlamaConfig  # noqa: E402

RELEASED = Path(__file__).resolve().parents[1] / "../shared/data/duo_attention_patterns/" \
    "Llama-3-8B-Instruct-Gradient-1048k"
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5)
PRESETS = {
    "smoke": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, contexts=(1024, 2048), context=0, new_tokens=16,
                  repeats=2, page_size=16, logical_page_size=4, budget=256, sink=16, local=64, prefill_sink=16,
                  prefill_local=256, duo_sink=16, duo_recent=64, duo_chunk=1024, duo_max_context=0, bf16=0,
                  transformers=1),
    # DuoAttention's cache attends each prefill chunk to the whole buffer with XLA's softmax ([chunk, max_len]
    # scores per head): small chunks, and only up to duo_max_context tokens unless overridden.
    "full": dict(**LLAMA3_8B, contexts=(32768, 65536, 131072, 262144), context=0, new_tokens=128, repeats=1,
                 page_size=64, logical_page_size=16, budget=4096, sink=128, local=256, prefill_sink=128,
                 prefill_local=8192, duo_sink=128, duo_recent=256, duo_chunk=512, duo_max_context=131072, bf16=1,
                 transformers=1),
}
SPARSITY = 0.5  # every LServe script; DuoAttention's released deployments


def model_config(opts) -> LlamaConfig:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")
    extra = {k: opts[k] for k in ("rope_theta", "rms_norm_eps") if k in opts}
    return LlamaConfig(**{k: opts[k] for k in keys}, **extra, max_position_embeddings=1 << 20)


def parse_args(argv: list[str], presets: dict[str, dict], doc: str, pattern: bool = True) -> tuple[str, dict, str]:
    """(preset name, its options with the key=<int> overrides, the `pattern=` value or ""; pattern=False: no such
    option); `--help` / `-h` prints `doc` and exits, anything else that is not an option exits with the usage
    (`benchmarks.parse_preset`)."""
    given = [a for a in argv if pattern and a.startswith("pattern=")]
    opts = parse_preset([a for a in argv if a not in given], presets, default="smoke", doc=doc)
    return opts.preset, opts, given[-1].split("=", 1)[1] if given else ""


def gate_values(mc: LlamaConfig, pattern: str = "", released: Path = RELEASED) -> tuple[np.ndarray, str]:
    """Gate values alpha [layers, kv_heads] and where they came from: the `pattern` directory, else `released` when
    present and of the model's shape, else random gates (seed 0). SystemExit for a `pattern` of another shape."""
    shape = (mc.num_hidden_layers, mc.num_key_value_heads)
    source = Path(pattern) if pattern else released
    if source.is_dir():
        alpha, _, _ = da.load_pattern(source)
        if alpha.shape == shape:
            return alpha, f"pattern {source.resolve()}"
        if pattern:
            raise SystemExit(f"pattern {pattern} has shape {alpha.shape}, the model {shape}")
    return np.random.default_rng(0).random(shape), "synthetic pattern (random gates)"


def retrieval_pattern(mc: LlamaConfig, pattern: str) -> tuple[np.ndarray, str]:
    """Bool [layers, kv_heads] retrieval heads (the quantile rule at `SPARSITY`) and where they came from."""
    alpha, source = gate_values(mc, pattern)
    return da.select_retrieval_heads(alpha, SPARSITY), f"{source}, quantile rule at sparsity {SPARSITY}"


def build_model(opts: dict, preset: str, note: str = "") -> Llama:
    """The preset's random-weight Llama (bfloat16 when opts["bf16"], else float32); prints what runs where."""
    mc = model_config(opts)
    dtype = jnp.bfloat16 if opts["bf16"] else jnp.float32
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); preset {preset}; model {mc.hidden_size} "
          f"hidden x {mc.num_hidden_layers} layers, {mc.num_attention_heads} q / {mc.num_key_value_heads} KV heads, "
          f"{jnp.dtype(dtype).name}, random weights{note}")
    return Llama(mc, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)


def lserve_config(opts: dict, ctx: int, n: int, **changes) -> LServeConfig:
    """The preset's LServe settings for one `ctx`-token prompt and `n` new tokens (sparse prefill on, the whole
    prompt in one prefill call, as the official scripts); `changes` replace fields."""
    return LServeConfig(**{**dict(
        max_len=ctx + n, page_size=opts["page_size"], logical_page_size=opts["logical_page_size"],
        token_budget=opts["budget"], sink=opts["sink"], local=opts["local"], prefill_sink=opts["prefill_sink"],
        prefill_local=opts["prefill_local"], sparse_prefill=True, prefill_chunk=ctx), **changes})


def best_of(fn, repeats: int):
    """fn() after a warm-up call; the fastest of `repeats` results by their 'total' time."""
    fn()
    return min((fn() for _ in range(repeats)), key=lambda r: r["total"])


def time_lserve(model, lcfg, streaming, prompt, n, repeats):
    """LServe `Engine(model, lcfg, streaming_heads=streaming)` on one prompt, n >= 2 greedy tokens: prefill s, decode
    ms/token (the engine's own split), KV GiB held, and per decode step the KV pages (one KV head's page) and MiB
    read."""
    engine = Engine(model, lcfg, streaming_heads=streaming)

    def once():
        out = engine.generate([prompt], n, eos_id=None)  # n tokens, as the torch side's min_new_tokens
        st = out.stats[0]
        return {"prefill s": st["prefill_s"], "decode ms/token": 1e3 * st["decode_s"] / (n - 1),
                "KV GiB": out.kv_nbytes / 2**30, "pages read/step": st["kv_pages_read"] / st["decode_steps"],
                "KV MiB read/step": st["kv_bytes_per_step"] / 2**20, "total": st["prefill_s"] + st["decode_s"]}

    return best_of(once, repeats)


def time_split(generate, n, repeats):
    """Prefill = a 1-token generation; decode per token from the n-token generation minus that. generate(k) -> KV
    bytes. The decode figure is NaN when the difference is within the spread of the 1-token timings (noise)."""
    def run(k):
        t = time.perf_counter()
        kv = generate(k)
        return time.perf_counter() - t, kv

    run(1), run(n)  # warm-up: compiles both
    t1 = [run(1)[0] for _ in range(repeats)]
    tn, kv = min(run(n) for _ in range(repeats))
    decode = tn - min(t1)
    if decode <= max(t1) - min(t1):
        decode = float("nan")
    return {"prefill s": min(t1), "decode ms/token": 1e3 * decode / (n - 1), "KV GiB": kv / 2**30, "total": tn}


def duo_generator(model, retrieval, prompt, max_len: int, *, sink: int, recent: int, chunk: int):
    """generate(k) -> KV bytes held: `jaxeff.duo_attention.generate` of k tokens after `prompt` with the official
    window, `chunk`-token prefill chunks and a cache of `max_len` tokens."""
    def gen(k):
        out = da.generate(model, [prompt], k, retrieval_heads=retrieval, sink=sink, recent=recent, chunk_size=chunk,
                          max_len=max_len, eos_id=None)
        return out.kv_nbytes

    return gen


def time_duo(model, retrieval, opts, prompt, n, repeats):
    gen = duo_generator(model, retrieval, prompt, len(prompt) + n, sink=opts["duo_sink"], recent=opts["duo_recent"],
                        chunk=opts["duo_chunk"])
    return time_split(gen, n, repeats)


def torch_model(mc: LlamaConfig, full: bool):
    """(generate(prompt, k) -> KV bytes, device name) for transformers with random weights, or (None, reason)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        return None, f"skipped: {e.name} is not installed"
    cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
    if full and not cuda:
        return None, "skipped: the full preset compares on CUDA and torch has no CUDA device here"
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32 if not full else torch.bfloat16)
    cfg = transformers.LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
                                   intermediate_size=mc.intermediate_size, num_hidden_layers=mc.num_hidden_layers,
                                   num_attention_heads=mc.num_attention_heads,
                                   num_key_value_heads=mc.num_key_value_heads, rope_theta=mc.rope_theta,
                                   rms_norm_eps=mc.rms_norm_eps, max_position_embeddings=mc.max_position_embeddings)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # initialise the random weights in the target dtype
    try:
        with torch.device(device):
            hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    finally:
        torch.set_default_dtype(torch.float32)
    item = torch.finfo(dtype).bits // 8

    def generate(prompt, k):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=k, min_new_tokens=k,
                              do_sample=False, pad_token_id=0)
        out.cpu()  # waits for the GPU
        return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * (len(prompt) + k) * item

    return generate, f"{device} ({dtype})"


RATIOS = {"prefill x": "prefill s", "decode x": "decode ms/token", "KV mem x": "KV GiB"}


def ratios(r: dict, ref: dict, suffix: str = "", keys: dict = RATIOS) -> dict:
    """{name + suffix: ref[measure] / r[measure]} for each name: measure of `keys` in both (> 1: r is faster or
    smaller)."""
    return {name + suffix: ref[m] / r[m] for name, m in keys.items() if m in r and m in ref}


def fmt_table(rows):
    cols = list(dict.fromkeys(c for r in rows for c in r))
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) + 2 for c in cols]
    lines = ["".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def main(argv):
    preset, opts, pattern = parse_args(argv, PRESETS, __doc__)
    full = preset == "full"
    contexts = (opts["context"],) if opts["context"] else opts["contexts"]
    n, repeats = opts["new_tokens"], opts["repeats"]
    if n < 2:
        raise SystemExit("new_tokens must be >= 2 (decode time per token)")
    model = build_model(opts, preset, f"; contexts {contexts}; {n} new tokens; best of {repeats}")
    mc = model.config
    retrieval, source = retrieval_pattern(mc, pattern)
    streaming = ~retrieval
    print(f"{source}: {int(streaming.sum())}/{streaming.size} KV heads streaming")
    hf_generate, hf_note = torch_model(mc, full) if opts["transformers"] else (None, "skipped: transformers=0")
    print(f"transformers: {hf_note}")
    rng = np.random.default_rng(0)
    rows = []
    for ctx in contexts:
        prompt = rng.integers(0, mc.vocab_size, ctx).tolist()
        base = lserve_config(opts, ctx, n)
        dense_cfg = dataclasses.replace(base, dynamic_sparsity=False)
        duo_ok = not opts["duo_max_context"] or ctx <= opts["duo_max_context"]
        if not duo_ok:
            print(f"  context {ctx}: DuoAttention skipped (duo_max_context={opts['duo_max_context']})")
        results = {}
        for name in ("lserve", "lserve dense", "duo", "duo dense", "transformers"):
            if (name.startswith("duo") and not duo_ok) or (name == "transformers" and hf_generate is None):
                continue
            t0 = time.perf_counter()
            if name.startswith("lserve"):
                lcfg, heads = (base, streaming) if name == "lserve" else (dense_cfg, None)
                results[name] = time_lserve(model, lcfg, heads, prompt, n, repeats)
            elif name.startswith("duo"):
                heads = retrieval if name == "duo" else np.ones_like(retrieval)
                results[name] = time_duo(model, heads, opts, prompt, n, repeats)
            else:
                results[name] = time_split(partial(hf_generate, prompt), n, repeats)
            print(f"  context {ctx}: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        for name, r in results.items():
            row = {"context": ctx, "engine": name, **{k: v for k, v in r.items() if k != "total"}}
            dense = results.get(f"{name} dense")
            for ref_name, ref in (("own dense", dense), ("transformers", results.get("transformers"))):
                if ref is not None and ref is not r:
                    row.update(ratios(r, ref, f" vs {ref_name}"))
            rows.append(row)
    print("\nx = the reference's time (or KV bytes) / this engine's; > 1 is faster (smaller). KV: bytes the cache "
          "holds after the prompt (LServe: page pools of max_len = prompt + new tokens; DuoAttention: full + ring "
          "buffers; transformers: prompt + new tokens, computed). nan: decode time within the timing noise of the "
          "prefill (engines timed as generate(new_tokens) - generate(1)).")
    print(fmt_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
