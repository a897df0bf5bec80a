"""The compiled Pallas kernels (Triton on GPU, Mosaic on TPU) against their plain-JAX references.

Interpret mode on CPU (the other pallas tests) checks the math; only these run the kernels as the hardware
compiles them, so block shapes, masking of ragged edges and GQA indexing are checked on the real backend.
Skipped on a machine without a GPU or TPU; `pytest -k pallas` on a GPU/TPU box runs them
(`JAXEFF_PALLAS_DEVICE_INTERPRET=1` runs the same checks on CPU with the kernels in interpret mode, to check the
tests themselves). Built to finish in a few minutes on a device: small shapes; inputs and jitted references built
once per shape group in module-scoped fixtures; the decode cases of a group share one cache (one append compile).
Inputs are drawn fresh on every run (the seed is in the failure message); errors are normwise,
||out - ref|| / ||ref||, against a reference in float32 at the highest matmul precision.
"""

import os
import secrets
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

ON_DEVICE = jax.default_backend() in ("gpu", "tpu")
INTERPRET = not ON_DEVICE and os.environ.get("JAXEFF_PALLAS_DEVICE_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (ON_DEVICE or INTERPRET), reason="compiled Pallas kernels need a GPU or TPU")

# Triton's float32 dot runs in tf32 (~3e-4 normwise); bfloat16 operands land between 1e-3 and 1e-2.
TOL = {jnp.float32: 3e-3, jnp.bfloat16: 2e-2}


def _rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all(), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# (batch, Sq, q_offset, Hq, Hkv, D, sink, local, streaming flags, dtype): ragged lengths (not multiples of the
# blocks), GQA 1..4, a chunked-prefill offset, sink 0, every head streaming.
HYBRID_CASES = {
    "f32_d64_gqa4_ragged": (2, 300, 0, 8, 2, 64, 16, 64, [True, False], jnp.float32),
    "bf16_d128_chunk_offset": (1, 200, 260, 8, 4, 128, 4, 100, [True, False, True, False], jnp.bfloat16),
    "bf16_d64_all_streaming_sink0": (1, 257, 0, 4, 4, 64, 0, 33, [True] * 4, jnp.bfloat16),
    "bf16_d128_mixed_gqa4": (1, 384, 0, 16, 4, 128, 16, 128, [True, False, False, True], jnp.bfloat16),
}
# "cudnn": dense heads through cuDNN, streaming heads through the Triton kernel (GPU, q_offset 0, bf16).
NEEDS_GPU = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")


def _cudnn(name):
    return pytest.param(name, "cudnn", marks=NEEDS_GPU)


HYBRID_RUNS = [(name, "pallas") for name in HYBRID_CASES] + [_cudnn("bf16_d128_mixed_gqa4")]


def _fwd_bwd(fn, cot, *args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cot.astype(out.dtype))


@pytest.fixture(scope="module")
def hybrid_case():
    """Inputs and the float32 reference (forward + gradients) per case, computed once and shared by the runs."""
    cache = {}

    def get(name):
        if name not in cache:
            b, sq, off, hq, hkv, d, sink, local, stream, dtype = HYBRID_CASES[name]
            seed = secrets.randbits(31)
            kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
            q = jax.random.normal(kq, (b, sq, hq, d), dtype)
            k = jax.random.normal(kk, (b, sq + off, hkv, d), dtype)
            v = jax.random.normal(kv, (b, sq + off, hkv, d), dtype)
            cot = jax.random.normal(kc, q.shape, dtype)
            kw = dict(streaming_heads=np.array(stream), sink=sink, local=local, q_offset=off)
            with jax.default_matmul_precision("highest"):
                ref = jax.jit(lambda *a: _fwd_bwd(partial(pk.hybrid_attention_reference, **kw), cot, *a))(
                    *(x.astype(jnp.float32) for x in (q, k, v)))
            cache[name] = seed, (q, k, v), cot, kw, ref
        return cache[name]

    return get


@pytest.mark.parametrize("name,implementation", HYBRID_RUNS)
def test_pallas_device_hybrid_attention_forward_and_grads(hybrid_case, name, implementation):
    seed, (q, k, v), cot, kw, (ref, ref_grads) = hybrid_case(name)
    fn = partial(pk.hybrid_attention, **kw, implementation=implementation, interpret=INTERPRET)
    out, grads = jax.jit(lambda *a: _fwd_bwd(fn, cot, *a))(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    errors = {"out": _rel(out, ref), **{f"d{n}": _rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}
    assert max(errors.values()) < TOL[q.dtype.type], f"seed {seed}: {errors}"


# Non-causal (every key visible; HART's attention over its KV cache): (batch, Sq, Sk, Hq, Hkv, D, dtype), ragged
# lengths, Sq > Sk and Sq < Sk, GQA.
NONCAUSAL_CASES = {
    "f32_d64_gqa2_more_keys": (2, 200, 333, 4, 2, 64, jnp.float32),
    "bf16_d64_more_queries": (1, 300, 130, 8, 8, 64, jnp.bfloat16),
    "bf16_d128_gqa4_ragged": (1, 257, 700, 8, 2, 128, jnp.bfloat16),
}
NONCAUSAL_RUNS = [(name, "pallas") for name in NONCAUSAL_CASES] + [
    _cudnn(name) for name, case in NONCAUSAL_CASES.items() if case[-1] == jnp.bfloat16]


@pytest.mark.parametrize("name,implementation", NONCAUSAL_RUNS)
def test_pallas_device_non_causal_attention_forward_and_grads(name, implementation):
    b, sq, sk, hq, hkv, d, dtype = NONCAUSAL_CASES[name]
    seed = secrets.randbits(31)
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q, cot = jax.random.normal(kq, (b, sq, hq, d), dtype), jax.random.normal(kc, (b, sq, hq, d), dtype)
    k, v = (jax.random.normal(key, (b, sk, hkv, d), dtype) for key in (kk, kv))
    kw = dict(streaming_heads=np.zeros(hkv, bool), sink=0, local=1, causal=False)
    with jax.default_matmul_precision("highest"):
        ref, ref_grads = jax.jit(lambda *a: _fwd_bwd(partial(pk.hybrid_attention_reference, **kw), cot, *a))(
            *(x.astype(jnp.float32) for x in (q, k, v)))
    fn = partial(pk.hybrid_attention, **kw, implementation=implementation, interpret=INTERPRET)
    out, grads = jax.jit(lambda *a: _fwd_bwd(fn, cot, *a))(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    errors = {"out": _rel(out, ref), **{f"d{n}": _rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}
    assert max(errors.values()) < TOL[q.dtype.type], f"seed {seed}: {errors}"


# One shape group: batch 3 with ragged lengths over a shuffled pool with spare pages, 8 query / 2 KV heads, D 128,
# pages of 64 (logical 16). Cases: (streaming flags, sink, local, budget pages or None, per query head, dtype).
DECODE_LENGTHS = [700, 70, 1000]
DECODE_CASES = {
    "f32_selected_per_query_head_mixed": ([True, False], 64, 256, 4, True, jnp.float32),
    "bf16_selected_per_kv_head_dense_only": ([False, False], 16, 64, 3, False, jnp.bfloat16),
    "bf16_all_pages_streaming_mixed": ([False, True], 16, 64, None, False, jnp.bfloat16),
}


@pytest.fixture(scope="module")
def decode_cache():
    """One filled cache (float32 and bfloat16 copies of the pools) and a jitted float32 reference per case."""
    seed = secrets.randbits(31)
    rng = np.random.default_rng(seed)
    b, hkv, d, page = 3, 2, 128, 64
    lengths = np.array(DECODE_LENGTHS)
    max_pages = -(-lengths.max() // page)
    num_pages = b * max_pages + 7
    table = rng.permutation(num_pages)[: b * max_pages].reshape(b, max_pages)
    cache = pk.init_paged_kv_cache(b, hkv, d, max_pages_per_seq=max_pages, page_size=page, logical_page_size=16,
                                   num_pages=num_pages, page_table=table)
    keys = rng.standard_normal((b, lengths.max(), hkv, d)).astype(np.float32)
    vals = rng.standard_normal((b, lengths.max(), hkv, d)).astype(np.float32)
    cache = jax.jit(pk.append_kv)(cache, keys, vals, lengths)
    q = jnp.asarray(rng.standard_normal((b, 8, d)), jnp.float32)
    return seed, cache, q


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_pallas_device_sparse_paged_decode(decode_cache, name):
    seed, cache, q32 = decode_cache
    stream, sink, local, budget, per_query_head, dtype = DECODE_CASES[name]
    selected = None
    if budget is not None:
        scores = jax.jit(partial(pk.page_scores, logical_page_size=16, per_query_head=per_query_head))(
            q32, cache.kmin, cache.kmax, cache.page_table, cache.lengths)
        selected = jax.jit(partial(pk.select_pages, budget=budget * 64, page_size=64))(scores, cache.lengths)
        assert selected.shape[1] == (8 if per_query_head else 2)
    kw = dict(streaming_heads=np.array(stream), sink=sink, local=local)
    q, kp, vp = (x.astype(dtype) for x in (q32, cache.k_pages, cache.v_pages))
    tail = (cache.page_table, cache.lengths, selected)
    out = jax.jit(partial(pk.sparse_paged_decode, **kw, implementation="pallas", interpret=INTERPRET))(q, kp, vp,
                                                                                                      *tail)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(partial(pk.sparse_paged_decode_reference, **kw))(
            *(x.astype(jnp.float32) for x in (q, kp, vp)), *tail)
    assert out.shape == q.shape and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype], f"seed {seed}: {_rel(out, ref)}"


@pytest.mark.skipif(not ON_DEVICE, reason="the engine's default kernels run compiled on a GPU/TPU only")
def test_pallas_device_lserve_engine_default_kernels_match_xla():
    """The LServe engine end to end with the backend's default kernels (GPU: cuDNN + Triton prefill, Triton
    flash-decoding; TPU: Mosaic) against the same engine on the XLA paths, both on this device: a tiny float32
    Llama with streaming heads and per-query-head page selection, prefilled in two chunks, then decoded across
    page boundaries; logits of every step within the tf32 tolerance."""
    from flax import nnx

    from jaxeff.lserve import LServeCache, LServeConfig
    from jaxeff.models.llama import Llama, LlamaConfig

    mc = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2)
    model = Llama(mc, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    streaming = np.array([[True, False], [False, True]])
    tokens = jnp.asarray(np.random.default_rng(secrets.randbits(31)).integers(0, 128, (2, 200)))
    step = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, p, cache=c))
    logits = {}
    for impl in (None, "xla"):
        cfg = LServeConfig(max_len=256, page_size=16, logical_page_size=4, token_budget=48, sink=16, local=32,
                           prefill_sink=16, prefill_local=64, sparse_prefill=True, prefill_chunk=96,
                           implementation=impl)
        cache = LServeCache.init(streaming, 2, mc.head_dim, cfg, group=4, prefill_chunks=2)
        outs = []
        for start in (0, 96):
            pos = jnp.broadcast_to(jnp.arange(start, start + 96), (2, 96))
            out, cache = step(state, tokens[:, start:start + 96], pos, cache.replace(prefill_offset=start))
            outs.append(out)
        cache = cache.to_decode()
        for p in range(192, 200):
            out, cache = step(state, tokens[:, p:p + 1], jnp.full((2, 1), p), cache)
            outs.append(out)
        logits[impl] = jnp.concatenate(outs, axis=1)
    assert _rel(logits[None], logits["xla"]) < TOL[jnp.float32]
