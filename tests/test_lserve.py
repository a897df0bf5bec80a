"""LServe engine: exactness against the plain decoder, windows per phase, per-query-head page lists, the
reselection schedule, page accounting, the head split given either way, clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.lserve import Engine, LServeCache, LServeConfig, ring_page_table
from jaxeff.models.llama import Llama, LlamaConfig
from jaxeff.models.llama import generate as dense_generate
from jaxeff.nn import xla_attention

NEW = 8
EVERY_HEAD_RETRIEVAL = np.ones((2, 2), bool)


@pytest.fixture(scope="module")
def setup():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, n).tolist() for n in (37, 20, 50)]
    return model, prompts, dense_generate(model, prompts, NEW).tokens


def small(**kw):
    base = dict(max_len=64, page_size=8, logical_page_size=4, token_budget=64, sink=4, local=8, prefill_chunk=32)
    return LServeConfig(**(base | kw))


def test_engine_equals_plain_decoder_with_sparsity_off(setup):
    model, prompts, ref = setup
    out = Engine(model, small(dynamic_sparsity=False), retrieval_heads=EVERY_HEAD_RETRIEVAL).generate(prompts, NEW)
    np.testing.assert_array_equal(out.tokens, ref)
    st = out.stats[1]
    assert st["prompt_tokens"] == 20 and st["decode_steps"] == NEW - 1
    # Dense decode reads every live page of every head: whole pages, so at least the dense token bytes.
    assert st["kv_bytes_per_step"] >= st["dense_kv_bytes_per_step"]


def test_engine_equals_dense_when_budget_and_window_cover_everything(setup):
    model, prompts, ref = setup
    streaming = np.array([[False, True], [True, False]])
    out = Engine(model, small(local=64, reselect_every=2), streaming_heads=streaming).generate(prompts, NEW)
    np.testing.assert_array_equal(out.tokens, ref)


def test_sparse_engine_reads_budget_pages(setup):
    model, prompts, _ = setup
    cfg = small(token_budget=24, reselect_every=4)
    streaming = np.array([[False, True], [True, False]])
    out = Engine(model, cfg, streaming_heads=streaming).generate(prompts, NEW)
    assert out.tokens.shape == (3, NEW)
    assert out.kv_nbytes < out.dense_kv_nbytes
    for st, length in zip(out.stats, (37, 20, 50)):
        steps = st["decode_steps"]
        # Per step and layer: the retrieval KV head's 2 query heads read <= 3 pages each (<= 6 distinct), the
        # streaming head its sink page and at most (local - 1) // page + 2 local pages.
        assert st["kv_pages_read"] <= steps * 2 * (2 * 3 + (1 + 2))
        if length == 50:  # 7 pages: the budget (3 pages per query head) binds
            assert st["kv_bytes_per_step"] < 0.85 * st["dense_kv_bytes_per_step"], st


def test_retrieval_heads_is_the_inverted_streaming_split(setup):
    """A DuoAttention selection (True = retrieval) passed as retrieval_heads= serves exactly as its inverse passed
    as streaming_heads= (the split and budget of test_sparse_engine_reads_budget_pages: compiled once)."""
    model, prompts, _ = setup
    cfg = small(token_budget=24, reselect_every=4)
    retrieval = np.array([[True, False], [False, True]])
    by_retrieval = Engine(model, cfg, retrieval_heads=retrieval)
    np.testing.assert_array_equal(by_retrieval.streaming_heads, ~retrieval)
    out = by_retrieval.generate(prompts, NEW)
    ref = Engine(model, cfg, streaming_heads=~retrieval).generate(prompts, NEW)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert [st["kv_pages_read"] for st in out.stats] == [st["kv_pages_read"] for st in ref.stats]
    assert out.kv_nbytes == ref.kv_nbytes < out.dense_kv_nbytes
    # streaming_heads=None (positional too, as benchmarks/serving.py passes it): no streaming head
    assert not Engine(model, cfg, streaming_heads=None).streaming_heads.any()
    with pytest.raises(TypeError):  # keyword-only: a positional mask could be read with the wrong convention
        Engine(model, cfg, np.zeros((2, 2), bool))


def test_head_split_errors(setup):
    model, _, _ = setup
    with pytest.raises(TypeError, match=r"exactly one of retrieval_heads= .* got neither"):
        Engine(model, small())
    with pytest.raises(TypeError, match="got retrieval_heads and streaming_heads"):
        Engine(model, small(), streaming_heads=np.zeros((2, 2), bool), retrieval_heads=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"retrieval_heads has shape \(2, 3\) but the model has 2 layers x 2 KV heads"):
        Engine(model, small(), retrieval_heads=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"retrieval_heads holds gate values \(float\): pass select_retrieval_heads"):
        Engine(model, small(), retrieval_heads=np.full((2, 2), 0.7))  # gate values, not a selection
    with pytest.raises(ValueError, match="retrieval_heads must be a bool array, got None"):
        Engine(model, small(), retrieval_heads=None)
    with pytest.raises(ValueError, match=r"streaming_heads holds integers: pass mask.astype\(bool\)"):
        Engine(model, small(), streaming_heads=np.zeros((2, 2), np.int64))


def test_ring_page_table_maps_local_pages_to_distinct_slots():
    table = ring_page_table(2, 10, n_sink=1, n_ring=3)
    assert table[0].tolist() == [0, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert table[1].min() == 4


def test_clear_errors(setup):
    model, prompts, _ = setup
    with pytest.raises(ValueError, match="at least 3 pages"):
        small(token_budget=16)
    with pytest.raises(ValueError, match="multiple of page_size"):
        small(token_budget=28)
    with pytest.raises(ValueError, match="multiple of reselect_every"):
        small(reselect_every=3)
    with pytest.raises(ValueError, match="longer than the cache"):
        Engine(model, small(max_len=40), retrieval_heads=EVERY_HEAD_RETRIEVAL).generate(prompts, NEW)
    with pytest.raises(ValueError, match=r"streaming_heads has shape \(32, 8\) .*pattern of another model"):
        Engine(model, small(), streaming_heads=np.zeros((32, 8), bool))
    cache = LServeCache.init(np.zeros((2, 2), bool), 1, model.config.head_dim, small())  # group 1, model has 2
    with pytest.raises(ValueError, match="pass group= to LServeCache.init"):
        jax.eval_shape(lambda c: model(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), cache=c), cache)


def test_official_defaults():
    cfg = LServeConfig()
    assert (cfg.sink, cfg.local, cfg.prefill_sink, cfg.prefill_local) == (128, 256, 128, 8192)
    assert (cfg.page_size, cfg.logical_page_size, cfg.token_budget, cfg.reselect_every) == (64, 16, 4096, 4)
    assert not cfg.sparse_prefill and cfg.per_query_head and cfg.dynamic_sparsity


def _phase_reference(model, tokens, streaming, prompt_len, prefill_window, decode_window):
    """One-shot forward where a query at a prompt position uses the prefill window (None: dense) and a later one
    the decode window on streaming heads."""
    graphdef, state = nnx.split(model)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    p = np.arange(tokens.shape[1])
    qp, kp = p[:, None], p[None, :]

    def window(sink, local):
        return (kp < sink) | (qp - kp < local)

    lam = np.where(qp < prompt_len, window(*prefill_window) if prefill_window else True, window(*decode_window))

    def attn(layer, q, k, v, *, q_positions, kv_positions):
        outs = []
        for h in range(k.shape[2]):
            mask = (kp <= qp) & (lam if streaming[layer][h] else True)
            mask = jnp.broadcast_to(jnp.asarray(mask), (q.shape[0],) + mask.shape)
            outs.append(xla_attention(q[:, :, h * group:(h + 1) * group], k[:, :, h:h + 1], v[:, :, h:h + 1], mask,
                                      q.shape[-1] ** -0.5))
        return jnp.concatenate(outs, axis=2)

    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, attention_fn=attn))(state, tokens)


def _drive(model, cache, tokens, chunk, prompt_len):
    """Prefill `prompt_len` tokens in chunks, then decode the rest one token at a time; logits of every step."""
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, p, cache=c))
    b, outs, caches = tokens.shape[0], [], []
    for start in range(0, prompt_len, chunk):
        pos = jnp.broadcast_to(jnp.arange(start, start + chunk), (b, chunk))
        logits, cache = step(state, tokens[:, start:start + chunk], pos, cache.replace(prefill_offset=start))
        outs.append(logits)
    cache = cache.to_decode()
    for p in range(prompt_len, tokens.shape[1]):
        logits, cache = step(state, tokens[:, p:p + 1], jnp.full((b, 1), p), cache)
        outs.append(logits)
        caches.append(cache)
    return jnp.concatenate(outs, 1), caches


def test_windows_per_phase_with_a_ring_smaller_than_the_prompt(setup):
    """Sparse prefill window (sink 4, local 16) in two chunks, then decode with a smaller window (sink 4, local 8)
    whose ring holds fewer pages than the prefill ring: every logit equals the one-shot forward with the mask of
    each phase. (A dense prefill in two chunks: test_engine_equals_dense_when_budget_and_window_cover_everything.)"""
    model, _, _ = setup
    cfg = small(sink=4, local=8, prefill_sink=4, prefill_local=16, sparse_prefill=True, dynamic_sparsity=False)
    streaming = np.array([[True, False], [False, True]])
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 51)))
    cache = LServeCache.init(streaming, 2, model.config.head_dim, cfg, group=2, prefill_chunks=2)
    assert cache.streaming_pools[0].k_pages.shape[1] == 2 * (1 + 3)  # prefill ring: 1 sink + 3 local pages
    dense_prefill = LServeCache.init(streaming, 2, model.config.head_dim, small(sparse_prefill=False), group=2,
                                     prefill_chunks=2)
    assert dense_prefill.streaming_pools[0].k_pages.shape[1] == 2 * 8  # every page
    logits, caches = _drive(model, cache, tokens, 24, 48)
    assert caches[0].streaming_pools[0].k_pages.shape[1] == 2 * (1 + 2)  # decode ring: 1 sink + 2 local pages
    ref = _phase_reference(model, tokens, streaming, 48, (4, 16), (4, 8))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=2e-5)


def test_page_lists_per_query_head_and_reselection_schedule(setup):
    """Rows of different lengths decode across page boundaries (page 8, reselect every 4, budget 3 pages): a row
    reselects exactly at its first decode step and when its history length is a multiple of 4, each list holds
    min(3, pages) pages ending with the current page, and the two query heads of a GQA group pick their own
    lists (which differ at some step)."""
    model, _, _ = setup
    cfg = small(token_budget=24, reselect_every=4)
    streaming = np.zeros((2, 2), bool)
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 30)))
    cache = LServeCache.init(streaming, 2, model.config.head_dim, cfg, group=2)
    # Row 1's prompt is 3 tokens shorter: right-pad it as the engine does (position -1, never stored).
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, p, cache=c))
    pos = np.tile(np.arange(13), (2, 1))
    pos[1, 10:] = -1
    _, cache = step(state, tokens[:, :13], jnp.asarray(pos), cache.replace(prefill_offset=0))
    cache = cache.to_decode()
    hist = np.array([13, 10])
    reselected, lists = [], []
    for _ in range(15):
        before = np.asarray(cache.stats_read)
        feed = jnp.asarray(np.asarray(tokens)[np.arange(2), hist][:, None])
        _, cache = step(state, feed, jnp.asarray(hist[:, None]), cache)
        reselected.append((np.asarray(cache.stats_read) > before).tolist())
        sel = np.asarray(cache.selected[0])
        assert sel.shape == (2, 2 * 2, 3)  # rows: the 2 query heads of each of the 2 retrieval KV heads
        for r in range(2):
            n_pages = hist[r] // 8 + 1
            for row in sel[r]:
                live = row[row >= 0]
                assert len(live) == min(3, n_pages) and live.max() == hist[r] // 8, (hist[r], row)
        lists.append(sel)
        hist = hist + 1
    for r, start in enumerate((13, 10)):
        want = [h == start or h % 4 == 0 for h in range(start, start + 15)]
        assert [x[r] for x in reselected] == want
    groups = np.stack(lists).reshape(15, 2, 2, 2, 3)  # step, row, KV head, query head of the group, pages
    assert (groups[:, :, :, 0] != groups[:, :, :, 1]).any()
def test_engine_stops_at_any_of_several_stop_ids(setup):
    model, prompts, free = setup
    stops = (int(free[0, 2]), int(free[1, 1]))  # row 0 stops at its third token at the latest, row 1 at its second
    ref = dense_generate(model, prompts, NEW, eos_id=stops, pad_id=63)
    assert ref.num_generated[0] <= 3 and ref.num_generated[1] <= 2
    engine = Engine(model, small(dynamic_sparsity=False), retrieval_heads=EVERY_HEAD_RETRIEVAL)
    out = engine.generate(prompts, NEW, eos_id=list(stops), pad_id=63)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.num_generated, ref.num_generated)
    # The checkpoint's stop ids by default (generation_config.json's over config.json's, as llama.generate); the
    # same weights under a config that names them. eos_id=None still never stops.
    cfg = dataclasses.replace(model.config, eos_token_id=5, generation_eos_token_id=stops)
    engine = Engine(nnx.merge(nnx.graphdef(Llama(cfg, rngs=nnx.Rngs(0))), nnx.state(model)),
                    small(dynamic_sparsity=False), retrieval_heads=EVERY_HEAD_RETRIEVAL)
    default = engine.generate(prompts, NEW, pad_id=63)
    np.testing.assert_array_equal(default.tokens, ref.tokens)
    np.testing.assert_array_equal(default.num_generated, ref.num_generated)
    np.testing.assert_array_equal(engine.generate(prompts, NEW, eos_id=None, pad_id=63).tokens, free)


def test_cache_refuses_gate_values_as_the_streaming_mask():
    """LServeCache.init cast its mask to bool, so alpha made every head a streaming head; 0/1 integers could be
    head indices. Both are refused by name (jaxeff.duo_attention.check_head_mask)."""
    alpha = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    with pytest.raises(ValueError, match=r"streaming_heads holds gate values .*~select_retrieval_heads"):
        LServeCache.init(alpha, 1, 8, small())
    with pytest.raises(ValueError, match=r"streaming_heads holds integers: pass mask.astype\(bool\) .*streaming"):
        LServeCache.init(np.array([[0, 1], [1, 0]]), 1, 8, small())
    assert LServeCache.init(alpha > 0.5, 1, 8, small()).streaming == ((0,), (1,))
