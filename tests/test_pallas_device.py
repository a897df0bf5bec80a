"""The compiled Pallas kernels (Triton on GPU, Mosaic on TPU) against their plain-JAX references.

Interpret mode on CPU (the other pallas tests) checks the math; only these run the kernels as the hardware
compiles them, so block shapes, masking of ragged edges and GQA indexing are checked on the real backend.
Skipped on a machine without a GPU or TPU; `pytest -k pallas` on a GPU/TPU box runs them. Inputs are drawn fresh
on every run (the seed is in the failure message); errors are normwise, ||out - ref|| / ||ref||, against a
reference in float32 at the highest matmul precision.
"""

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

pytestmark = pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                                reason="compiled Pallas kernels need a GPU or TPU")

# Triton's float32 dot runs in tf32 (~3e-4 normwise); bfloat16 operands land between 1e-3 and 1e-2.
TOL = {jnp.float32: 3e-3, jnp.bfloat16: 2e-2}


def _rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all(), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# (batch, Sq, q_offset, Hq, Hkv, D, sink, local, streaming flags, dtype): ragged lengths, GQA 1..4, chunked prefill.
HYBRID_CASES = {
    "f32_d64_gqa4_ragged": (2, 1000, 0, 8, 2, 64, 64, 256, [True, False], jnp.float32),
    "bf16_d128_chunk_offset": (1, 777, 1300, 16, 4, 128, 4, 100, [True, False, True, False], jnp.bfloat16),
    "bf16_d128_all_dense": (1, 2048, 0, 8, 8, 128, 64, 256, [False] * 8, jnp.bfloat16),
    "bf16_d64_all_streaming_sink0": (2, 513, 0, 4, 4, 64, 0, 33, [True] * 4, jnp.bfloat16),
    "bf16_d128_mixed_gqa4": (1, 1500, 0, 16, 4, 128, 64, 256, [True, False, False, True], jnp.bfloat16),
}
# "cudnn": dense heads through cuDNN, streaming heads through the Triton kernel (GPU, q_offset 0, bf16).
HYBRID_RUNS = [(name, "pallas") for name in HYBRID_CASES] + [
    ("bf16_d128_mixed_gqa4", "cudnn"), ("bf16_d128_all_dense", "cudnn"), ("bf16_d64_all_streaming_sink0", "cudnn")]


@pytest.mark.parametrize("name,implementation", HYBRID_RUNS)
def test_pallas_device_hybrid_attention_forward_and_grads(name, implementation):
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        pytest.skip("cuDNN needs an NVIDIA GPU")
    b, sq, off, hq, hkv, d, sink, local, stream, dtype = HYBRID_CASES[name]
    seed = secrets.randbits(31)
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, sq, hq, d), dtype)
    k = jax.random.normal(kk, (b, sq + off, hkv, d), dtype)
    v = jax.random.normal(kv, (b, sq + off, hkv, d), dtype)
    cot = jax.random.normal(kc, q.shape, dtype)
    kw = dict(streaming_heads=np.array(stream), sink=sink, local=local, q_offset=off)

    def fwd_bwd(fn, *args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cot.astype(out.dtype))

    out, grads = jax.jit(lambda q, k, v: fwd_bwd(
        lambda q, k, v: pk.hybrid_attention(q, k, v, **kw, implementation=implementation), q, k, v))(q, k, v)
    with jax.default_matmul_precision("highest"):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref, ref_grads = jax.jit(lambda q, k, v: fwd_bwd(
            lambda q, k, v: pk.hybrid_attention_reference(q, k, v, **kw), q, k, v))(*f32)
    assert out.shape == q.shape and out.dtype == dtype
    errors = {"out": _rel(out, ref), **{f"d{n}": _rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}
    assert max(errors.values()) < TOL[dtype], f"seed {seed}: {errors}"


DECODE_CASES = {  # (batch, Hq, Hkv, D, page, lengths, sink, local, budget pages or None, streaming, dtype)
    "f32_gqa4_selected": (3, 8, 2, 128, 64, [1500, 70, 4033], 64, 256, 8, [True, False], jnp.float32),
    "bf16_gqa8_dense_all_pages": (2, 32, 4, 128, 64, [3000, 129], 16, 64, None, [False, True] * 2, jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_pallas_device_sparse_paged_decode(name):
    b, hq, hkv, d, page, lengths, sink, local, budget, stream, dtype = DECODE_CASES[name]
    seed = secrets.randbits(31)
    rng = np.random.default_rng(seed)
    lengths = np.array(lengths)
    max_pages = -(-lengths.max() // page)
    num_pages = b * max_pages + 7
    table = rng.permutation(num_pages)[: b * max_pages].reshape(b, max_pages)
    cache = pk.init_paged_kv_cache(b, hkv, d, max_pages_per_seq=max_pages, page_size=page, logical_page_size=16,
                                   num_pages=num_pages, page_table=table, dtype=dtype)
    keys = rng.standard_normal((b, lengths.max(), hkv, d)).astype(np.float32)
    vals = rng.standard_normal((b, lengths.max(), hkv, d)).astype(np.float32)
    cache = jax.jit(pk.append_kv)(cache, keys.astype(dtype), vals.astype(dtype), lengths)
    q = jnp.asarray(rng.standard_normal((b, hq, d)), dtype)
    selected = None
    if budget is not None:
        scores = pk.page_scores(q, cache.kmin, cache.kmax, cache.page_table, cache.lengths, logical_page_size=16)
        selected = pk.select_pages(scores, cache.lengths, budget=budget * page, page_size=page)
    kw = dict(streaming_heads=np.array(stream), sink=sink, local=local)
    args = (q, cache.k_pages, cache.v_pages, cache.page_table, cache.lengths, selected)
    out = jax.jit(lambda *a: pk.sparse_paged_decode(*a, **kw, implementation="pallas"))(*args)
    with jax.default_matmul_precision("highest"):
        ref = pk.sparse_paged_decode_reference(q.astype(jnp.float32), *(x.astype(jnp.float32) for x in args[1:3]),
                                               *args[3:], **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype], f"seed {seed}: {_rel(out, ref)}"
