"""make bench name=attention: the DuoAttention / LServe kernels against dense attention, side by side in one run.

1. Prefill (CPU, XLA block-sparse path): hybrid_attention with half the KV heads streaming, DuoAttention's / LServe's
   decode window (sink 128, local 256) and LServe's prefill window (sink 128, local 8192), vs the same path with
   every head dense (causal): measured time ratio next to the active-block ratio.
2. Decode (CPU, XLA path): KV bytes read per step and time vs dense decode over every page, with LServe's rules:
   pages of 64 / logical pages of 16, min(max(3, budget // 64), pages) pages per list (budget 1024 tokens),
   selected per query head (official: the query heads of a GQA group may pick different pages), per KV head (the
   shared-list deviation), and per query head with 50% streaming heads (sink 128, local 256). "KV MiB/step" counts
   the distinct pages of each KV head (the union over its query heads); "kernel page reads" counts every list
   entry the kernel loads (per query head with per-query-head lists).
3. Non-causal (HART's attention over its KV cache: every key visible), float32 on CPU / bfloat16 on GPU, Sq
   queries over Sk keys (default HART's last 1024px scale, 4096 over 9750, and a quarter of it): the front door's
   "xla" (materialises the [H, Sq, Sk] scores) and "dot_product" (`jax.nn.dot_product_attention`, XLA too), the
   kernel entry point's XLA path (`hybrid_attention(causal=False, implementation="xla")`, per-chunk einsums), and
   on a GPU also the front door's "pallas" (cuDNN for bf16) and the Triton-style kernel; time ratios to "xla".
4. The front door's reference "xla" against "dot_product" (`jax.nn.dot_product_attention`, XLA too), float32,
   forward and forward+backward, at three CPU-sized calls: causal prefill 1 x 512 tokens, 8 q / 2 KV heads (GQA
   4:1); decode, batch 8, one query over 2048 keys, 8 / 2 heads; HART-like non-causal 1024 queries over 2438 keys,
   2 heads; D 64; ratios > 1 mean "xla" is faster.
5. GPU (only when a GPU is present), bfloat16: cuDNN dense causal attention vs the Pallas kernel with all heads
   dense and with 50% streaming heads (sink 128, local 256), vs the default GPU path (dense heads through cuDNN,
   streaming heads through Pallas), forward and forward+backward; the Pallas kernel's Triton launch parameters; and
   part 2's decode comparison with the Pallas decode kernel at GPU sizes.

Overrides (ints, or comma-separated ints for lists), e.g. `python -m benchmarks.attention lengths=4096,16384
history=32768 repeats=2`. Options: lengths, heads, kv_heads, head_dim, history, decode_heads, decode_kv_heads,
budget, repeats, gpu_lengths, gpu_history, nc_q, nc_kv (zipped), parts (comma-separated subset of
prefill,decode,noncausal,reference,gpu,gpu_decode).
"""

from __future__ import annotations

import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import pallas_kernels as pk
from benchmarks import best_time
from jaxeff.nn.attention import attention

SINK, LOCAL, BLOCK = 128, 256, 128  # DuoAttention's deployed window, LServe's decode window
PREFILL_LOCAL = 8192  # LServe's prefill window (ctx_local_token)
PAGE, LOGICAL_PAGE = 64, 16
DEFAULTS = {"lengths": [4096, 16384, 32768], "heads": 2, "kv_heads": 2, "head_dim": 64, "repeats": 2,
            "history": [32768, 131072], "decode_heads": 4, "decode_kv_heads": 2, "budget": 1024,
            "gpu_lengths": [32768, 65536, 131072], "gpu_history": [131072, 524288],
            "nc_q": [1024, 4096], "nc_kv": [2438, 9750], "parts": "prefill,decode,noncausal,reference,gpu,gpu_decode"}


def parse(argv):
    opts = dict(DEFAULTS)
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in opts:
            raise SystemExit(f"unknown option {key!r}; options: {sorted(opts)}")
        if isinstance(DEFAULTS[key], str):
            opts[key] = value
            continue
        ints = [int(x) for x in value.split(",")]
        opts[key] = ints if isinstance(DEFAULTS[key], list) else ints[0]
    return opts


def half_streaming(n):
    return np.arange(n) < n // 2


def prefill_rows(opts):
    hq, hkv, d = opts["heads"], opts["kv_heads"], opts["head_dim"]
    rows = []
    for n in tqdm(opts["lengths"], desc="prefill"):
        kq, kk, kv = jax.random.split(jax.random.key(n), 3)
        q = jax.random.normal(kq, (1, n, hq, d))
        k = jax.random.normal(kk, (1, n, hkv, d))
        v = jax.random.normal(kv, (1, n, hkv, d))
        times, blocks = {}, {}
        variants = (("dense", np.zeros(hkv, bool), LOCAL), ("hybrid", half_streaming(hkv), LOCAL),
                    ("hybrid 8192", half_streaming(hkv), PREFILL_LOCAL))
        for name, stream, local in variants:
            fn = jax.jit(lambda q, k, v, s=stream, w=local: pk.hybrid_attention(
                q, k, v, streaming_heads=s, sink=SINK, local=w, implementation="xla", block_q=BLOCK, block_k=BLOCK))
            times[name] = best_time(fn, q, k, v, repeats=opts["repeats"])
            blocks[name] = pk.hybrid_attention_block_count(n, n, stream, sink=SINK, local=local, block_q=BLOCK,
                                                           block_k=BLOCK)
        row = {"tokens": n, "dense s": times["dense"]}
        for name in ("hybrid", "hybrid 8192"):
            row[f"{name} s"] = times[name]
            row[f"{name} time ratio"] = times["dense"] / times[name]
            row[f"{name} block ratio"] = blocks["dense"] / blocks[name]
        if n <= 8192:  # jax's own dense attention materialises [H, n, n] scores: only at short lengths
            row["jax.nn dense s"] = best_time(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True)), q, k, v, repeats=opts["repeats"])
        rows.append(row)
    return rows


def non_causal_rows(opts):
    hq, d = opts["heads"], opts["head_dim"]
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    dense = np.zeros(hq, bool)
    kernel = lambda impl: lambda q, k, v: pk.hybrid_attention(q, k, v, streaming_heads=dense, sink=0, local=1,
                                                              causal=False, implementation=impl)
    front_door = lambda impl: lambda q, k, v: attention(q, k, v, causal=False, implementation=impl)
    fns = {"front door xla": front_door("xla"), "front door dot_product": front_door("dot_product"),
           "kernel XLA path": kernel("xla")}
    if on_gpu:  # the front door's "pallas" takes cuDNN for bf16; the kernel's "pallas" is the Triton-style kernel
        fns |= {"front door pallas": front_door("pallas"), "Triton kernel": kernel("pallas")}
    rows = []
    for sq, sk in tqdm(list(zip(opts["nc_q"], opts["nc_kv"], strict=True)), desc="non-causal"):
        kq, kk, kv = jax.random.split(jax.random.key(sq), 3)
        q = jax.random.normal(kq, (1, sq, hq, d), dtype)
        k, v = (jax.random.normal(key, (1, sk, hq, d), dtype) for key in (kk, kv))
        row = {"queries": sq, "keys": sk, "score MiB (xla)": hq * sq * sk * 4 / 2**20}
        base = None
        for name, fn in fns.items():
            t = best_time(jax.jit(fn), q, k, v, repeats=opts["repeats"])
            base = t if base is None else base
            row[f"{name} s"], row[f"{name} x"] = t, base / t
        rows.append(row)
    return rows


REFERENCE_CALLS = (("causal prefill", 1, 512, 512, 8, 2, True), ("decode", 8, 1, 2048, 8, 2, True),
                   ("HART-like non-causal", 1, 1024, 2438, 2, 2, False))


def reference_rows(opts):
    rows = []
    for name, b, sq, sk, hq, hkv, causal in tqdm(REFERENCE_CALLS, desc="reference"):
        kq, kk, kv = jax.random.split(jax.random.key(sq), 3)
        q = jax.random.normal(kq, (b, sq, hq, opts["head_dim"]))
        k, v = (jax.random.normal(key, (b, sk, hkv, opts["head_dim"])) for key in (kk, kv))
        row = {"call": name, "B x Sq x Sk": f"{b}x{sq}x{sk}", "heads q/kv": f"{hq}/{hkv}"}
        for mode, wrap in (("fwd", jax.jit), ("fwd+bwd", _fwd_bwd)):
            t = {impl: best_time(wrap(lambda q, k, v, i=impl, c=causal: attention(q, k, v, causal=c, implementation=i)),
                                 q, k, v, repeats=opts["repeats"] * 5) for impl in ("xla", "dot_product")}
            row[f"xla {mode} s"], row[f"dot_product {mode} s"] = t["xla"], t["dot_product"]
            row[f"{mode} xla x"] = t["dot_product"] / t["xla"]
        rows.append(row)
    return rows


def decode_rows(opts, *, heads, kv_heads, head_dim, history, implementation="xla", dtype=jnp.float32):
    hq, hkv, d, budget = heads, kv_heads, head_dim, opts["budget"]
    rows = []
    for n in tqdm(history, desc="decode"):
        max_pages = -(-n // PAGE)
        cache = pk.init_paged_kv_cache(1, hkv, d, max_pages_per_seq=max_pages, page_size=PAGE,
                                       logical_page_size=LOGICAL_PAGE, dtype=dtype)
        kk, kv, kq = jax.random.split(jax.random.key(n), 3)
        cache = jax.jit(pk.append_kv)(cache, jax.random.normal(kk, (1, n, hkv, d), dtype),
                                      jax.random.normal(kv, (1, n, hkv, d), dtype))
        q = jax.random.normal(kq, (1, hq, d), dtype)
        itemsize = cache.k_pages.dtype.itemsize
        page_bytes = 2 * PAGE * d * itemsize  # K and V of one page of one head

        def select(q, cache, per_query_head):
            scores = pk.page_scores(q, cache.kmin, cache.kmax, cache.page_table, cache.lengths,
                                    logical_page_size=LOGICAL_PAGE, per_query_head=per_query_head)
            return pk.select_pages(scores, cache.lengths, budget=budget, page_size=PAGE)

        select_q = jax.jit(partial(select, per_query_head=True))
        select_kv = jax.jit(partial(select, per_query_head=False))
        selected, shared = select_q(q, cache), select_kv(q, cache)
        stats_bytes = 2 * hkv * max_pages * (PAGE // LOGICAL_PAGE) * d * itemsize  # kmin + kmax, all heads
        configs = (("dense (all pages)", np.zeros(hkv, bool), None, None),
                   (f"selected {budget} tok per q head", np.zeros(hkv, bool), selected, select_q),
                   (f"selected {budget} tok per KV head", np.zeros(hkv, bool), shared, select_kv),
                   ("per q head + 50% streaming", half_streaming(hkv), selected, select_q))
        # Reference point without paging: jax's dense attention over contiguous K/V of the same history.
        k_flat = jax.random.normal(kk, (1, n, hkv, d), dtype)
        v_flat = jax.random.normal(kv, (1, n, hkv, d), dtype)
        t_flat = best_time(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v)), q, k_flat, v_flat,
                           repeats=opts["repeats"] * 3)
        rows.append({"history": n, "config": "jax.nn dense, contiguous", "KV MiB/step": 2 * k_flat.nbytes / 2**20,
                     "decode s": t_flat, "vs contiguous": 1.0})
        dense_time = None
        for name, stream, sel, chooser in configs:
            fn = jax.jit(lambda q, c, s, st=stream: pk.sparse_paged_decode(
                q, c.k_pages, c.v_pages, c.page_table, c.lengths, s, streaming_heads=st, sink=SINK, local=LOCAL,
                implementation=implementation))
            t = best_time(fn, q, cache, sel, repeats=opts["repeats"] * 3)
            lists = np.asarray(pk.decode_page_lists(cache.page_table, cache.lengths, sel, stream, sink=SINK,
                                                    local=LOCAL, page_size=PAGE))
            per_kv = lists.reshape(1, hkv, -1)  # a KV head's rows together: count its distinct pages
            distinct = sum(len(np.unique(row[row >= 0])) for row in per_kv[0])
            dense_time = t if dense_time is None else dense_time
            row = {"history": n, "config": name, "KV MiB/step": distinct * page_bytes / 2**20,
                   "kernel page reads": int((lists >= 0).sum()), "decode s": t, "vs contiguous": t_flat / t,
                   "vs paged dense": dense_time / t}
            if sel is not None:
                n_sel_heads = int((~stream).sum())
                row["stats MiB/select"] = stats_bytes * n_sel_heads / hkv / 2**20
                row["select s"] = best_time(chooser, q, cache, repeats=opts["repeats"] * 3)
                # LServe reselects every 4 tokens (history length % 4 == 0).
                row["vs contiguous (select/4)"] = t_flat / (t + row["select s"] / 4)
            rows.append(row)
    return rows


def _gpu_inputs(n, hq, hkv, d):
    kq, kk, kv = jax.random.split(jax.random.key(n), 3)
    return (jax.random.normal(kq, (1, n, hq, d), jnp.bfloat16), jax.random.normal(kk, (1, n, hkv, d), jnp.bfloat16),
            jax.random.normal(kv, (1, n, hkv, d), jnp.bfloat16))


def _fwd_bwd(fn):
    return jax.jit(lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                                            argnums=(0, 1, 2))(q, k, v))


def gpu_rows(opts):
    """Forward (and forward+backward) times: cuDNN dense causal vs the Pallas kernel (all heads dense, and 50%
    streaming) vs the default hybrid path (dense heads through cuDNN, streaming heads through Pallas)."""
    hq, hkv, d = 32, 8, 128
    dense_flags, half = np.zeros(hkv, bool), half_streaming(hkv)

    def hybrid(flags, implementation, **kw):
        return lambda q, k, v: pk.hybrid_attention(q, k, v, streaming_heads=flags, sink=SINK, local=LOCAL,
                                                   implementation=implementation, **kw)

    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    variants = {"cudnn dense": cudnn, "pallas dense": hybrid(dense_flags, "pallas"),
                "pallas hybrid": hybrid(half, "pallas"), "cudnn+pallas hybrid": hybrid(half, "cudnn")}
    rows = []
    for n in tqdm(opts["gpu_lengths"], desc="gpu prefill"):
        args = _gpu_inputs(n, hq, hkv, d)
        row = {"tokens": n}
        for name, fn in variants.items():
            row[f"{name} s"] = best_time(jax.jit(fn), *args, repeats=opts["repeats"])
        for name in variants:
            row[f"{name} x"] = row["cudnn dense s"] / row[f"{name} s"]
        for name in ("cudnn dense", "cudnn+pallas hybrid"):  # training: forward + backward
            row[f"{name} fwd+bwd s"] = best_time(_fwd_bwd(variants[name]), *args, repeats=opts["repeats"])
        row["fwd+bwd x"] = row["cudnn dense fwd+bwd s"] / row["cudnn+pallas hybrid fwd+bwd s"]
        rows.append(row)
    return rows


def gpu_tuning_rows(opts):
    """Triton launch parameters of the Pallas kernel, all heads dense (the kernel's worst case)."""
    n = opts["gpu_lengths"][0]
    args = _gpu_inputs(n, 32, 8, 128)
    rows = []
    for bq, bk, warps, stages in ((128, 128, 4, 2), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
                                  (128, 64, 8, 3), (64, 64, 4, 3)):
        fn = jax.jit(lambda q, k, v, bq=bq, bk=bk, w=warps, st=stages: pk.hybrid_attention(
            q, k, v, streaming_heads=np.zeros(8, bool), sink=SINK, local=LOCAL, implementation="pallas",
            block_q=bq, block_k=bk, num_warps=w, num_stages=st))
        t = best_time(fn, *args, repeats=opts["repeats"])
        tflops = 4 * n * n / 2 * 128 * 32 / t / 1e12  # causal: half of the QK^T and PV products
        rows.append({"tokens": n, "block_q": bq, "block_k": bk, "num_warps": warps, "num_stages": stages,
                     "fwd s": t, "TFLOP/s": tflops})
    return rows


def table(title, rows):
    cols = list(dict.fromkeys(c for r in rows for c in r))
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) + 2 for c in cols]
    print(f"\n{title}")
    print("".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)))


def main(argv):
    opts = parse(argv)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); options: {opts}")
    parts = opts["parts"].split(",")
    if "prefill" in parts:
        table(f"Prefill, XLA block-sparse path: {opts['heads']} q heads / {opts['kv_heads']} KV heads, D "
              f"{opts['head_dim']}, 50% streaming (sink {SINK}, local {LOCAL} or {PREFILL_LOCAL}) vs all dense; "
              f"blocks {BLOCK}x{BLOCK}",
              prefill_rows(opts))
    if "noncausal" in parts:
        table(f"Non-causal (HART's cached attention), batch 1, {opts['heads']} heads, D {opts['head_dim']}, "
              f"{'bfloat16' if jax.default_backend() == 'gpu' else 'float32'}; x = speed-up over the front door's "
              "xla", non_causal_rows(opts))
    if "reference" in parts:
        table(f"The front door's reference \"xla\" vs \"dot_product\" (jax's XLA attention), float32, D "
              f"{opts['head_dim']}; x = speed-up of xla", reference_rows(opts))
    if "decode" in parts:
        table(f"Decode, XLA path, batch 1, {opts['decode_heads']} q / {opts['decode_kv_heads']} KV heads, "
              f"page {PAGE} / logical {LOGICAL_PAGE}, float32",
              decode_rows(opts, heads=opts["decode_heads"], kv_heads=opts["decode_kv_heads"],
                          head_dim=opts["head_dim"], history=opts["history"]))
    if not {"gpu", "gpu_decode"} & set(parts):
        return
    if jax.default_backend() != "gpu":
        print("\nGPU parts skipped: no GPU on this machine.")
        return
    if "gpu" in parts:
        table(f"GPU prefill, bfloat16, 32 q / 8 KV heads, D 128, 50% streaming heads (sink {SINK}, local {LOCAL}); "
              "x = speed-up over cuDNN dense causal", gpu_rows(opts))
        table("Pallas kernel launch parameters (all heads dense, forward)", gpu_tuning_rows(opts))
    if "gpu_decode" in parts:
        table(f"GPU decode, Pallas kernels, batch 1, 32 q / 8 KV heads, D 128, bfloat16, page {PAGE} / logical "
              f"{LOGICAL_PAGE}", decode_rows(opts, heads=32, kv_heads=8, head_dim=128, history=opts["gpu_history"],
                                              implementation="pallas", dtype=jnp.bfloat16))


if __name__ == "__main__":
    main(sys.argv[1:])
