"""hybrid_attention: XLA block-sparse path and both Pallas kernels (interpret mode) against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk
from pallas_kernels.hybrid_attention import _pallas_gpu_forward, _pallas_hybrid, hybrid_mask, make_config

# (Sq, q_offset, Hq, Hkv, D, sink, local, streaming, dtype): odd lengths, GQA 1/2/4/8, sink/local edge cases.
CASES = {
    "gqa2_mixed": (37, 0, 4, 2, 64, 3, 5, [True, False], jnp.float32),
    "gqa8_offset_local1_sink0": (29, 19, 8, 1, 64, 0, 1, [True], jnp.float32),
    "gqa1_sink_covers_all": (21, 3, 2, 2, 64, 100, 4, [True, True], jnp.float32),
    "gqa4_all_dense_d128": (45, 0, 16, 4, 128, 8, 16, [False] * 4, jnp.float32),
    "bf16_long_window": (70, 11, 4, 2, 128, 4, 40, [False, True], jnp.bfloat16),
}
BLOCK = 16


def _inputs(key, sq, q_offset, hq, hkv, d, dtype, batch=2):
    kq, kk, kv = jax.random.split(jax.random.key(key), 3)
    sk = sq + q_offset
    return (jax.random.normal(kq, (batch, sq, hq, d), dtype), jax.random.normal(kk, (batch, sk, hkv, d), dtype),
            jax.random.normal(kv, (batch, sk, hkv, d), dtype))


def _tol(dtype):
    return 3e-2 if dtype == jnp.bfloat16 else 2e-5


@pytest.mark.parametrize("name", list(CASES))
def test_pallas_hybrid_matches_reference(name):
    sq, off, hq, hkv, d, sink, local, stream, dtype = CASES[name]
    q, k, v = _inputs(len(name), sq, off, hq, hkv, d, dtype, batch=1 + (dtype == jnp.bfloat16))
    kw = dict(streaming_heads=np.array(stream), sink=sink, local=local, q_offset=off)
    ref = np.asarray(pk.hybrid_attention_reference(q, k, v, **kw), np.float32)
    xla = jax.jit(lambda q, k, v: pk.hybrid_attention(q, k, v, **kw, implementation="xla", block_q=BLOCK,
                                                      block_k=BLOCK))(q, k, v)
    tpu_style = pk.hybrid_attention(q, k, v, **kw, implementation="pallas", interpret=True, block_q=BLOCK,
                                    block_k=BLOCK)
    flags, cfg = make_config(q, k, kw["streaming_heads"], sink=sink, local=local, q_offset=off, scale=None,
                             block_q=BLOCK, block_k=BLOCK)
    gpu_style = _pallas_gpu_forward(q, k, v, flags, cfg, True)[0]
    for out in (xla, tpu_style, gpu_style):
        assert out.dtype == dtype and out.shape == q.shape
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=_tol(dtype), rtol=_tol(dtype))


def test_pallas_hybrid_reference_is_token_exact():
    # The reference itself against a brute-force numpy loop (so the kernels are not checked against a twin bug).
    sq, off, sink, local = 9, 4, 2, 3
    q, k, v = _inputs(7, sq, off, 2, 1, 64, jnp.float32, batch=1)
    out = pk.hybrid_attention_reference(q, k, v, streaming_heads=np.array([True]), sink=sink, local=local,
                                        q_offset=off)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for i in range(sq):
        p = off + i
        keys = [j for j in range(p + 1) if j < sink or p - j < local]
        s = qn[0, i, 1] @ kn[0, keys, 0].T / 8.0
        w = np.exp(s - s.max())
        np.testing.assert_allclose(np.asarray(out[0, i, 1]), (w / w.sum()) @ vn[0, keys, 0], atol=1e-5)


def test_pallas_hybrid_tpu_interpret_mode():
    sq, off, hq, hkv, d, sink, local, stream, dtype = CASES["gqa2_mixed"]
    q, k, v = _inputs(3, sq, off, hq, hkv, d, dtype, batch=1)
    kw = dict(streaming_heads=np.array(stream), sink=sink, local=local, q_offset=off)
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: pk.hybrid_attention_reference(q, k, v, **kw), q, k, v)
    with pltpu.force_tpu_interpret_mode():
        out, vjp = jax.vjp(lambda q, k, v: pk.hybrid_attention(q, k, v, **kw, implementation="pallas",
                                                               block_q=BLOCK, block_k=BLOCK), q, k, v)
        grads = vjp(out)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for grad, r in zip(grads, ref_vjp(out)):
        np.testing.assert_allclose(grad, r, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("sq,off,hq,hkv,sink,local,stream,dtype", [
    (27, 6, 4, 2, 2, 7, [True, False], jnp.float32),
    (40, 0, 8, 2, 0, 5, [True, True], jnp.bfloat16),
])
def test_pallas_hybrid_gradients_match_reference(sq, off, hq, hkv, sink, local, stream, dtype):
    q, k, v = _inputs(11, sq, off, hq, hkv, 64, dtype, batch=1)
    kw = dict(streaming_heads=np.array(stream), sink=sink, local=local, q_offset=off)
    cot = jax.random.normal(jax.random.key(5), q.shape, dtype)

    def loss(fn):
        return lambda q, k, v: jnp.sum((fn(q, k, v) * cot).astype(jnp.float32))

    ref = jax.grad(loss(lambda q, k, v: pk.hybrid_attention_reference(q, k, v, **kw)), (0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    tol = 5e-2 if dtype == jnp.bfloat16 else 5e-5
    flags, cfg = make_config(q, k, kw["streaming_heads"], sink=sink, local=local, q_offset=off, scale=None,
                             block_q=BLOCK, block_k=BLOCK)
    paths = {"xla": lambda q, k, v: pk.hybrid_attention(q, k, v, **kw, implementation="xla", block_q=BLOCK,
                                                        block_k=BLOCK),
             # The Pallas forward and backward kernels of both styles, in the interpreter.
             "tpu_kernels": lambda q, k, v: _pallas_hybrid(q, k, v, flags, cfg, "tpu", True),
             "gpu_kernels": lambda q, k, v: _pallas_hybrid(q, k, v, flags, cfg, "gpu", True)}
    for f in paths.values():
        grads = jax.jit(jax.grad(loss(f), (0, 1, 2)))(q, k, v)
        for grad, r in zip(grads, ref):
            assert grad.dtype == dtype
            np.testing.assert_allclose(np.asarray(grad, np.float32), r, atol=tol, rtol=tol)


def test_pallas_hybrid_traced_streaming_heads():
    # Flags under jit (e.g. an nnx.Variable): no static head split, same numbers.
    q, k, v = _inputs(13, 33, 0, 4, 2, 64, jnp.float32, batch=1)
    flags = jnp.array([False, True])
    kw = dict(sink=3, local=6)
    ref = pk.hybrid_attention_reference(q, k, v, streaming_heads=flags, **kw)
    for impl in ("xla", "pallas"):
        out = jax.jit(lambda q, k, v, f, impl=impl: pk.hybrid_attention(
            q, k, v, streaming_heads=f, **kw, implementation=impl, interpret=True, block_q=BLOCK,
            block_k=BLOCK))(q, k, v, flags)
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_pallas_hybrid_single_query_with_unused_trailing_keys():
    # A decode-like call: one query at position 40 over a 60-slot KV buffer whose tail is not yet written.
    q = jax.random.normal(jax.random.key(21), (1, 1, 4, 64))
    k, v = (jax.random.normal(jax.random.key(i), (1, 60, 2, 64)) for i in (22, 23))
    kw = dict(streaming_heads=np.array([True, False]), sink=3, local=7, q_offset=40)
    ref = pk.hybrid_attention_reference(q, k, v, **kw)
    for impl in ("xla", "pallas"):
        out = pk.hybrid_attention(q, k, v, **kw, implementation=impl, interpret=True)
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def _brute_force_blocks(sq, sk, off, stream, sink, local, bq, bk, wb=1):
    qpos = off + np.arange(sq)[:, None]
    kpos = np.arange(sk)[None, :]
    total = 0
    for s in stream:
        m = np.asarray(hybrid_mask(qpos, kpos, s, -(-sink // wb) * wb, -(-local // wb) * wb, wb))
        nq, nk = -(-sq // bq), -(-sk // bk)
        m = np.pad(m, ((0, nq * bq - sq), (0, nk * bk - sk)))
        total += int(m.reshape(nq, bq, nk, bk).any(axis=(1, 3)).sum())
    return total


@pytest.mark.parametrize("sq,off,sink,local,bq,bk,wb", [(300, 0, 64, 100, 32, 32, 1), (97, 203, 0, 1, 16, 32, 1),
                                                        (130, 5, 500, 3, 64, 16, 1), (256, 256, 20, 64, 32, 64, 1),
                                                        (300, 0, 20, 40, 32, 16, 24), (97, 203, 5, 33, 16, 32, 8)])
def test_pallas_hybrid_block_count_is_exact(sq, off, sink, local, bq, bk, wb):
    stream = [True, False, True]
    expected = _brute_force_blocks(sq, sq + off, off, stream, sink, local, bq, bk, wb)
    got = pk.hybrid_attention_block_count(sq, sq + off, stream, sink=sink, local=local, q_offset=off, block_q=bq,
                                          block_k=bk, window_block=wb)
    assert got == expected


def test_pallas_hybrid_block_mask_is_the_official_training_mask():
    # DuoAttention's training kernel (block_streaming_attn_func, 1 sink block + 2 local blocks of 128): query block
    # i sees key blocks 0, i - 1 and i (causal), i.e. 128 + j + 1 recent keys at offset j inside its block.
    n, wb = 640, 128
    mask = np.asarray(hybrid_mask(np.arange(n)[:, None], np.arange(n)[None, :], True, 128, 256, wb))
    hand = np.zeros((n, n), bool)
    for p in range(n):
        i = p // wb
        for blk in {0, max(i - 1, 0), i}:
            hand[p, blk * wb: min((blk + 1) * wb, p + 1)] = True
    np.testing.assert_array_equal(mask, hand)
    recent = [(mask[p, 128:] if p >= 256 else mask[p, :0]).sum() for p in range(256, n)]
    assert min(recent) == 129 and max(recent) == 256
    assert pk.hybrid_attention_block_count(n, n, [True], sink=128, local=256, window_block=wb) == 1 + 2 + 3 * 3
    # Token-exact is window_block 1; rounding: sink 100 / local 200 with 128-blocks are 1 sink + 2 local blocks.
    q, k, v = _inputs(31, 300, 0, 2, 1, 64, jnp.float32, batch=1)
    a = pk.hybrid_attention_reference(q, k, v, streaming_heads=[True], sink=100, local=200, window_block=wb)
    b = pk.hybrid_attention_reference(q, k, v, streaming_heads=[True], sink=128, local=256, window_block=wb)
    np.testing.assert_array_equal(a, b)


def test_pallas_hybrid_block_mask_kernels_match_reference():
    # Forward and gradients of the XLA path and both Pallas kernel styles (interpreter) with a block-granular
    # window (sink 5 -> 8, local 12 -> 16) whose 8-blocks differ from the kernels' 16-blocks, chunk at offset 9.
    sq, off, sink, local, wb = 35, 9, 5, 12, 8
    q, k, v = _inputs(17, sq, off, 4, 2, 64, jnp.float32, batch=1)
    kw = dict(streaming_heads=np.array([True, False]), sink=sink, local=local, q_offset=off, window_block=wb)
    cot = jax.random.normal(jax.random.key(6), q.shape)

    def out_and_grads(fn):  # one compilation for the forward and the backward
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cot)

    ref, ref_grads = out_and_grads(lambda q, k, v: pk.hybrid_attention_reference(q, k, v, **kw))
    flags, cfg = make_config(q, k, kw["streaming_heads"], sink=sink, local=local, q_offset=off, scale=None,
                             block_q=BLOCK, block_k=BLOCK, window_block=wb)
    paths = {"xla": lambda q, k, v: pk.hybrid_attention(q, k, v, **kw, implementation="xla", block_q=BLOCK,
                                                        block_k=BLOCK),
             "tpu_kernels": lambda q, k, v: _pallas_hybrid(q, k, v, flags, cfg, "tpu", True),
             "gpu_kernels": lambda q, k, v: _pallas_hybrid(q, k, v, flags, cfg, "gpu", True)}
    for name, f in paths.items():
        out, grads = jax.jit(lambda f=f: out_and_grads(f))()
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5, err_msg=name)
        for grad, r in zip(grads, ref_grads):
            np.testing.assert_allclose(grad, r, atol=5e-5, rtol=5e-5, err_msg=name)
    # Not the token-exact mask: the block window is wider for most queries.
    token = pk.hybrid_attention_reference(q, k, v, **dict(kw, window_block=1))
    assert float(jnp.abs(token - ref).max()) > 1e-3


def test_pallas_hybrid_streaming_cost_is_constant_in_context():
    # sink 64 / local 256 with 128-blocks: each extra query block of a streaming head costs the sink block plus
    # 3 local blocks, however long the context; a dense head costs the causal triangle.
    def count(n, stream):
        return pk.hybrid_attention_block_count(n, n, [stream], sink=64, local=256)

    assert count(65536, True) - count(32768, True) == 4 * 256
    assert count(16384, False) == 128 * 129 // 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(hq=3, hkv=2), "multiple of KV heads"),
    (dict(stream=[True]), "streaming_heads must have shape"),
    (dict(sink=-1), "sink must be >= 0"),
    (dict(local=0), "local must be >= 1"),
    (dict(q_offset=5), "exceeds kv_len"),
    (dict(implementation="cudnn"), "implementation='cudnn' needs a GPU"),  # this machine has none; f32 too
    (dict(num_warps=0), "num_warps must be >= 1"),
    (dict(window_block=0), "window_block must be >= 1"),
])
def test_pallas_hybrid_bad_input_raises(kwargs, match):
    hq, hkv = kwargs.get("hq", 4), kwargs.get("hkv", 2)
    q = jnp.zeros((1, 8, hq, 64))
    k = jnp.zeros((1, 8, hkv, 64))
    with pytest.raises(ValueError, match=match):
        pk.hybrid_attention(q, k, k, streaming_heads=kwargs.get("stream", [True, False]), sink=kwargs.get("sink", 1),
                            local=kwargs.get("local", 2), q_offset=kwargs.get("q_offset", 0),
                            implementation=kwargs.get("implementation", "xla"), num_warps=kwargs.get("num_warps"),
                            window_block=kwargs.get("window_block", 1))


# Non-causal (HART's attention over its KV cache): (batch, Sq, Sk, Hq, Hkv, D, dtype); Sq != Sk, off the 16-blocks,
# more queries than keys, GQA 2 and 8.
NON_CAUSAL = {
    "f32_gqa2_sq_lt_sk": (2, 21, 45, 4, 2, 32, jnp.float32),
    "bf16_gqa8_sq_gt_sk": (1, 37, 19, 8, 1, 64, jnp.bfloat16),
}


@pytest.fixture(scope="module")
def non_causal_case():
    """Fresh random inputs, a cotangent and the float32 reference (output and gradients) per case, built once."""
    cache = {}

    def get(name):
        if name not in cache:
            b, sq, sk, hq, hkv, d, dtype = NON_CAUSAL[name]
            ks = jax.random.split(jax.random.key(np.random.SeedSequence().entropy % 2**31), 4)
            q, k, v = (jax.random.normal(key, (b, n, h, d), dtype)
                       for key, n, h in zip(ks, (sq, sk, sk), (hq, hkv, hkv), strict=False))
            cot = jax.random.normal(ks[3], q.shape, dtype)
            kw = dict(streaming_heads=np.zeros(hkv, bool), sink=0, local=1, causal=False)
            ref = jax.vjp(lambda *a: pk.hybrid_attention_reference(*a, **kw), *(x.astype(jnp.float32)
                                                                                 for x in (q, k, v)))
            cache[name] = (q, k, v, cot, kw, ref[0], ref[1](cot.astype(jnp.float32)))
        return cache[name]

    return get


def _fwd_bwd(f, q, k, v, cot):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(cot)


def _check_out_and_grads(out, grads, ref, ref_grads, dtype, name):
    tol = 3e-2 if dtype == jnp.bfloat16 else 5e-5
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol, err_msg=name)
    for grad, r in zip(grads, ref_grads, strict=True):
        assert grad.dtype == dtype
        np.testing.assert_allclose(np.asarray(grad, np.float32), r, atol=2 * tol, rtol=2 * tol, err_msg=name)


@pytest.mark.parametrize("name", list(NON_CAUSAL))
def test_pallas_hybrid_non_causal_matches_reference(non_causal_case, name):
    # Forward and gradients of the XLA path and both kernel styles (interpreter): every key visible, the padded
    # keys of the last 16-block masked (Sk 45 and 19 are off the block multiples).
    q, k, v, cot, kw, ref, ref_grads = non_causal_case(name)
    flags, cfg = make_config(q, k, kw["streaming_heads"], sink=0, local=1, q_offset=0, scale=None, block_q=BLOCK,
                             block_k=BLOCK, causal=False)
    paths = {"xla": lambda q, k, v: pk.hybrid_attention(q, k, v, **kw, implementation="xla", block_q=BLOCK,
                                                        block_k=BLOCK),
             "tpu_kernels": lambda q, k, v: _pallas_hybrid(q, k, v, flags, cfg, "tpu", True),
             "gpu_kernels": lambda q, k, v: _pallas_hybrid(q, k, v, flags, cfg, "gpu", True)}
    for path, f in paths.items():
        out, grads = jax.jit(lambda q, k, v, f=f: _fwd_bwd(f, q, k, v, cot))(q, k, v)
        _check_out_and_grads(out, grads, ref, ref_grads, q.dtype, f"{name}/{path}")


def test_pallas_hybrid_non_causal_tpu_interpret_mode(non_causal_case):
    # The public entry point under TPU interpret mode dispatches to the TPU-style forward and backward kernels.
    q, k, v, cot, kw, ref, ref_grads = non_causal_case("f32_gqa2_sq_lt_sk")
    with pltpu.force_tpu_interpret_mode():
        out, grads = jax.jit(lambda q, k, v: _fwd_bwd(lambda q, k, v: pk.hybrid_attention(
            q, k, v, **kw, implementation="pallas", block_q=BLOCK, block_k=BLOCK), q, k, v, cot))(q, k, v)
    _check_out_and_grads(out, grads, ref, ref_grads, q.dtype, "tpu_interpret")


def test_pallas_hybrid_non_causal_reference_is_plain_softmax():
    # The reference against numpy: every key visible, whatever Sq and Sk; and not the causal answer.
    q, k, v = (jax.random.normal(jax.random.key(i), (1, n, 2, 16)) for i, n in ((41, 5), (42, 9), (43, 9)))
    out = pk.hybrid_attention_reference(q, k, v, streaming_heads=[False, False], sink=0, local=1, causal=False)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("qhd,khd->hqk", qn[0], kn[0]) / 4.0
    w = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out[0], np.einsum("hqk,khd->qhd", w / w.sum(-1, keepdims=True), vn[0]), atol=1e-5)
    causal = pk.hybrid_attention_reference(q, k, v, streaming_heads=[False, False], sink=0, local=1, q_offset=4)
    assert float(jnp.abs(causal - out).max()) > 1e-2


def test_pallas_hybrid_non_causal_block_count_covers_every_block():
    # 100 queries over 300 keys in 32-blocks: 4 query blocks x 10 KV blocks per KV head, vs the causal triangle.
    assert pk.hybrid_attention_block_count(100, 300, [False] * 3, sink=0, local=1, block_q=32, block_k=32,
                                           causal=False) == 3 * 4 * 10
    assert pk.hybrid_attention_block_count(100, 300, [False] * 3, sink=0, local=1, block_q=32, block_k=32,
                                           q_offset=200) < 3 * 4 * 10  # the causal count of the same call is smaller


@pytest.mark.parametrize("kwargs,match", [
    (dict(streaming_heads=[True, False]), "dense heads only"),
    (dict(q_offset=3), "q_offset must be 0"),
    (dict(causal=1), "causal must be a Python bool"),
])
def test_pallas_hybrid_non_causal_bad_input_raises(kwargs, match):
    q, k = jnp.zeros((1, 8, 4, 64)), jnp.zeros((1, 12, 2, 64))
    kw = dict(streaming_heads=[False, False], sink=0, local=1, causal=False, implementation="xla") | kwargs
    with pytest.raises(ValueError, match=match):
        pk.hybrid_attention(q, k, k, **kw)


def test_pallas_hybrid_non_causal_refuses_traced_flags():
    q, k = jnp.zeros((1, 8, 4, 64)), jnp.zeros((1, 12, 2, 64))
    with pytest.raises(ValueError, match="concrete streaming_heads"):
        jax.jit(lambda f: pk.hybrid_attention(q, k, k, streaming_heads=f, sink=0, local=1, causal=False,
                                              implementation="xla"))(jnp.zeros(2, bool))


def test_pallas_front_door_non_causal_equals_xla():
    # jaxeff.nn.attention(causal=False, implementation="pallas") through the TPU-style kernel (TPU interpret mode),
    # default blocks (64 queries, 128 keys: 40 and 70 are off them), GQA 2.
    from jaxeff.nn.attention import attention

    ks = jax.random.split(jax.random.key(np.random.SeedSequence().entropy % 2**31), 3)
    q = jax.random.normal(ks[0], (2, 40, 4, 64))
    k, v = (jax.random.normal(key, (2, 70, 2, 64)) for key in ks[1:])
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(lambda q, k, v: attention(q, k, v, causal=False, scale=0.1, implementation="pallas"))(q, k, v)
    ref = attention(q, k, v, causal=False, scale=0.1, implementation="xla")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="needs default"):
        attention(q, k, v, causal=False, sliding_window=8, implementation="pallas")


def test_pallas_front_door_kernel_default_and_score_materialisation():
    from jaxeff.hart.transformer import query_chunk
    from jaxeff.nn.attention import kernel_default, materializes_scores, resolve_implementation

    # The opt-in TPU kernel: HART's last scale (non-causal) and a causal prefill; None where the kernel is not taken.
    assert kernel_default(4096, 9750, 64, causal=False, backend="tpu") == "pallas"
    assert kernel_default(4096, 4096, 128, backend="tpu") == "pallas"
    for sq, sk, d in ((1, 9750, 64), (127, 9750, 64), (4096, 9750, 72), (200, 100, 64)):
        assert kernel_default(sq, sk, d, backend="tpu") is None, (sq, sk, d)
    assert kernel_default(4096, 9750, 64, causal=False, backend="gpu") is None  # no dtype: not known to be cuDNN's
    assert kernel_default(4096, 9750, 64, causal=False, dtype=jnp.bfloat16, backend="gpu") == "pallas"
    assert kernel_default(4096, 9750, 64, causal=False, dtype=jnp.float32, backend="gpu") is None
    assert kernel_default(512, 1024, 64, dtype=jnp.bfloat16, backend="gpu") is None  # causal cuDNN needs Sq == Sk
    assert kernel_default(4096, 9750, 160, causal=False, dtype=jnp.float16, backend="gpu") is None
    assert kernel_default(64, 150, 64, causal=False, dtype=jnp.bfloat16, backend="gpu") is None  # a short scale
    assert kernel_default(4096, 9750, 64, causal=False, backend="cpu") is None
    # The default of None is unchanged: XLA on CPU, jax's dot_product_attention elsewhere.
    assert [resolve_implementation(None, b) for b in ("cpu", "gpu", "tpu")] == ["xla", "dot_product", "dot_product"]
    with pytest.raises(ValueError, match="unknown attention implementation"):
        resolve_implementation("flash")
    # jax's dot_product_attention without an implementation is XLA: it materialises on every backend.
    for backend in ("cpu", "gpu", "tpu"):
        assert materializes_scores("xla", backend) and materializes_scores("dot_product", backend)
        assert materializes_scores(None, backend)
        # "pallas" is a fused kernel on GPU / TPU; on CPU it is the kernel's chunked XLA path
        assert materializes_scores("pallas", backend) == (backend == "cpu")
    # HART's q_chunk="auto": chunks under the score budget only where the scores are materialised.
    assert query_chunk("auto", 2, 16, 9750) == 256
    assert query_chunk("auto", 2, 16, 9750, materializes=False) is None
    assert query_chunk(64, 2, 16, 9750, materializes=False) == 64
