"""Paged KV cache statistics, page scoring/selection and sparse_paged_decode (XLA + Pallas interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk
from pallas_kernels.sparse_decode import _DecodeCfg, _pallas_gpu_decode

B, HKV, D, PAGE, LPAGE, MAX_PAGES = 3, 2, 64, 16, 4, 8
LENGTHS = np.array([50, 7, 113])  # ragged, partially filled last pages (page 16, logical page 4)


@pytest.fixture(scope="module")
def filled():
    """A cache over a shuffled page pool (with spare pages), filled by a ragged prefill then one decode token."""
    rng = np.random.default_rng(0)
    num_pages = B * MAX_PAGES + 5
    table = rng.permutation(num_pages)[: B * MAX_PAGES].reshape(B, MAX_PAGES)
    cache = pk.init_paged_kv_cache(B, HKV, D, max_pages_per_seq=MAX_PAGES, page_size=PAGE,
                                   logical_page_size=LPAGE, num_pages=num_pages, page_table=table)
    keys = rng.standard_normal((B, LENGTHS.max(), HKV, D)).astype(np.float32)
    vals = rng.standard_normal((B, LENGTHS.max(), HKV, D)).astype(np.float32)
    append = jax.jit(pk.append_kv)
    cache = append(cache, keys[:, :-1], vals[:, :-1], LENGTHS - 1)
    last = np.stack([keys[b, n - 1] for b, n in enumerate(LENGTHS)])[:, None]
    lastv = np.stack([vals[b, n - 1] for b, n in enumerate(LENGTHS)])[:, None]
    cache = append(cache, last, lastv)
    return cache, keys, vals


def test_pallas_paged_append_stores_tokens_and_minmax(filled):
    cache, keys, vals = filled
    np.testing.assert_array_equal(cache.lengths, LENGTHS)
    table = np.asarray(cache.page_table)
    kp, vp, kmin, kmax = (np.asarray(x) for x in (cache.k_pages, cache.v_pages, cache.kmin, cache.kmax))
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            page = table[b, t // PAGE]
            np.testing.assert_array_equal(kp[:, page, t % PAGE], keys[b, t])
            np.testing.assert_array_equal(vp[:, page, t % PAGE], vals[b, t])
        for lp in range(-(-n // LPAGE)):
            page, sub = table[b, lp * LPAGE // PAGE], (lp * LPAGE % PAGE) // LPAGE
            seg = keys[b, lp * LPAGE: min((lp + 1) * LPAGE, n)]
            np.testing.assert_array_equal(kmin[:, page, sub], seg.min(0))
            np.testing.assert_array_equal(kmax[:, page, sub], seg.max(0))


def test_pallas_paged_stats_reset_when_page_is_reused():
    cache = pk.init_paged_kv_cache(1, 1, 8, max_pages_per_seq=2, page_size=8, logical_page_size=4)
    cache = pk.append_kv(cache, jnp.full((1, 6, 1, 8), 5.0), jnp.zeros((1, 6, 1, 8)))
    # Reuse the pool for a new sequence: the first token of each logical page must reset its statistics.
    fresh = pk.PagedKVCache(cache.k_pages, cache.v_pages, cache.kmin, cache.kmax, cache.page_table,
                            jnp.zeros(1, jnp.int32))
    fresh = pk.append_kv(fresh, -jnp.ones((1, 2, 1, 8)), jnp.zeros((1, 2, 1, 8)))
    np.testing.assert_array_equal(fresh.kmax[0, 0, 0], -1.0)


def test_pallas_page_scores_and_selection_per_query_head(filled):
    """Quest scores per query head (each with its own query) and per KV head (max over the group), against numpy;
    the top pages of each query head; the lists of a GQA group's query heads differ."""
    cache, keys, _ = filled
    hq = 4
    q = jax.random.normal(jax.random.key(1), (B, hq, D))
    args = (q, cache.kmin, cache.kmax, cache.page_table, cache.lengths)
    scores = np.asarray(pk.page_scores(*args, logical_page_size=LPAGE))
    shared = np.asarray(pk.page_scores(*args, logical_page_size=LPAGE, per_query_head=False))
    assert scores.shape == (B, hq, MAX_PAGES) and shared.shape == (B, HKV, MAX_PAGES)
    qn = np.asarray(q).reshape(B, HKV, hq // HKV, D)
    for b, n in enumerate(LENGTHS):
        for h in range(HKV):
            for p in range(MAX_PAGES):
                subs = [keys[b, s: min(s + LPAGE, n), h] for s in range(p * PAGE, min((p + 1) * PAGE, n), LPAGE)]
                want = [-np.inf if not subs else max(np.maximum(qg * k.max(0), qg * k.min(0)).sum() for k in subs)
                        for qg in qn[b, h]]
                np.testing.assert_allclose(scores[b, 2 * h: 2 * h + 2, p], want, rtol=1e-5)
                np.testing.assert_allclose(shared[b, h, p], max(want), rtol=1e-5)
    sel = np.asarray(pk.select_pages(jnp.asarray(scores), cache.lengths, budget=3 * PAGE, page_size=PAGE))
    for b, n in enumerate(LENGTHS):
        n_pages = -(-n // PAGE)
        for h in range(hq):
            live = sel[b, h][sel[b, h] >= 0]
            if n_pages <= 3:  # history fits the budget: every page
                assert sorted(live) == list(range(n_pages))
            else:  # newest page plus the two best of the others, by this query head's own scores
                best = np.argsort(-scores[b, h, : n_pages - 1])[:2]
                assert sorted(live) == sorted([*best, n_pages - 1])
    assert (sel[2, 0] != sel[2, 1]).any() or (sel[2, 2] != sel[2, 3]).any()  # 8 pages: the group's lists differ


@pytest.mark.parametrize("pages,budget_pages,want", [
    (1, 3, 1), (2, 1, 2),  # fewer pages than the floor: every page
    (5, 1, 3), (5, 2, 3),  # budgets below 3 pages: the official floor of 3 pages
    (4, 4, 4), (5, 4, 4), (12, 4, 4),  # at and above the budget: budget // page pages, never more
    (7, 16, 7),  # budget wider than the cache
])
def test_pallas_select_pages_count_formula(pages, budget_pages, want):
    """min(max(3, budget // page), pages) pages: the newest page plus the best of the others."""
    lengths = jnp.array([(pages - 1) * PAGE + 1, pages * PAGE])  # a fresh last page, a full one
    scores = jax.random.normal(jax.random.key(pages), (2, 3, 12))
    sel = np.asarray(pk.select_pages(scores, lengths, budget=budget_pages * PAGE, page_size=PAGE))
    assert sel.shape == (2, 3, max(3, budget_pages))
    assert pk.paged.selected_page_count(int(lengths[0]), budget=budget_pages * PAGE, page_size=PAGE) == want
    for row, hs in zip(sel, np.asarray(scores)):
        for lst, s in zip(row, hs):
            live = lst[lst >= 0]
            assert len(live) == want and live.max() == pages - 1 and (np.diff(live) > 0).all()
            assert sorted(live) == sorted([*np.argsort(-s[: pages - 1])[: want - 1], pages - 1])


DECODE_CASES = {  # streaming flags, Hq, sink, local, budget pages (None: dense), per query head, dtype
    "mixed_gqa2_selected_per_query_head": ([True, False], 4, 5, 20, 3, True, jnp.float32),
    "all_dense_gqa4_full": ([False, False], 8, 0, 1, None, False, jnp.float32),
    "all_streaming_gqa1_local1_sink0": ([True, True], 2, 0, 1, 3, True, jnp.float32),
    "bf16_gqa8_sink_beyond_history_per_kv_head": ([False, True], 16, 200, 3, 3, False, jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_pallas_sparse_paged_decode_matches_reference(filled, name):
    stream, hq, sink, local, budget, per_query_head, dtype = DECODE_CASES[name]
    cache, _, _ = filled
    kp, vp = cache.k_pages.astype(dtype), cache.v_pages.astype(dtype)
    q = jax.random.normal(jax.random.key(len(name)), (B, hq, D), dtype)
    selected = None
    if budget is not None:
        scores = pk.page_scores(q, cache.kmin, cache.kmax, cache.page_table, cache.lengths, logical_page_size=LPAGE,
                                per_query_head=per_query_head)
        selected = pk.select_pages(scores, cache.lengths, budget=budget * PAGE, page_size=PAGE)
    kw = dict(streaming_heads=np.array(stream), sink=sink, local=local)
    args = (q, kp, vp, cache.page_table, cache.lengths, selected)
    ref = np.asarray(pk.sparse_paged_decode_reference(*args, **kw), np.float32)
    xla = jax.jit(lambda *a: pk.sparse_paged_decode(*a, **kw, implementation="xla"))(*args)
    tpu_style = pk.sparse_paged_decode(*args, **kw, implementation="pallas", interpret=True)
    lists = pk.decode_page_lists(cache.page_table, cache.lengths, selected, np.array(stream), sink=sink,
                                 local=local, page_size=PAGE)
    gpu_style = _pallas_gpu_decode(q, kp, vp, cache.page_table, cache.lengths, lists,
                                   jnp.asarray(stream, jnp.int32), _DecodeCfg(sink, local, D**-0.5, PAGE), True)
    tol = 3e-2 if dtype == jnp.bfloat16 else 2e-5
    for out in (xla, tpu_style, gpu_style):
        assert out.shape == q.shape and out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)


def test_pallas_sparse_paged_decode_reference_is_token_exact(filled):
    """Per-query-head lists: query heads 2 and 3 share KV head 1 but read different pages (hand-built)."""
    cache, keys, vals = filled
    q = jax.random.normal(jax.random.key(2), (B, 2 * HKV, D))
    sel = jnp.array([[[0, -1], [0, -1], [1, -1], [0, 2]]] * B, jnp.int32)  # heads 0, 1: streaming, ignored
    out = pk.sparse_paged_decode_reference(q, cache.k_pages, cache.v_pages, cache.page_table, cache.lengths, sel,
                                           streaming_heads=[True, False], sink=3, local=9)
    for b, n in enumerate(LENGTHS):
        window = [t for t in range(n) if t < 3 or n - 1 - t < 9]
        page = [list(range(p * PAGE, min((p + 1) * PAGE, n))) for p in range(3)]
        for qh, toks in ((0, window), (1, window), (2, page[1]), (3, page[0] + page[2])):
            if not toks:
                continue
            s = keys[b, toks, qh // 2] @ np.asarray(q[b, qh]) / 8.0
            w = np.exp(s - s.max())
            np.testing.assert_allclose(out[b, qh], (w / w.sum()) @ vals[b, toks, qh // 2], atol=1e-5)


def test_pallas_sparse_paged_decode_tpu_interpret_mode(filled):
    cache, _, _ = filled
    q = jax.random.normal(jax.random.key(3), (B, 4, D))
    scores = pk.page_scores(q, cache.kmin, cache.kmax, cache.page_table, cache.lengths, logical_page_size=LPAGE)
    selected = pk.select_pages(scores, cache.lengths, budget=2 * PAGE, page_size=PAGE)
    args = (q, cache.k_pages, cache.v_pages, cache.page_table, cache.lengths, selected)
    kw = dict(streaming_heads=np.array([False, True]), sink=4, local=18)
    with pltpu.force_tpu_interpret_mode():
        out = pk.sparse_paged_decode(*args, **kw, implementation="pallas")
    np.testing.assert_allclose(out, pk.sparse_paged_decode_reference(*args, **kw), atol=2e-5, rtol=2e-5)


def test_pallas_sparse_paged_decode_bad_input_raises(filled):
    cache, _, _ = filled
    q = jnp.zeros((B, 4, D))
    base = dict(streaming_heads=[True, False], sink=2, local=4, implementation="xla")
    args = [q, cache.k_pages, cache.v_pages, cache.page_table, cache.lengths, None]
    with pytest.raises(ValueError, match="out of range"):
        bad = cache.page_table.at[1, 0].set(999)
        pk.sparse_paged_decode(*args[:3], bad, *args[4:], **base)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        pk.sparse_paged_decode(jnp.zeros((B, 3, D)), *args[1:], **base)
    with pytest.raises(ValueError, match="streaming_heads must have shape"):
        pk.sparse_paged_decode(*args, **{**base, "streaming_heads": [True]})
    with pytest.raises(ValueError, match="sink must be >= 0"):
        pk.sparse_paged_decode(*args, **{**base, "sink": -1})
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        pk.append_kv(cache, jnp.zeros((B, 20, HKV, D)), jnp.zeros((B, 20, HKV, D)))
    with pytest.raises(ValueError, match="out of range"):
        pk.init_paged_kv_cache(1, 1, 8, max_pages_per_seq=2, page_size=8, logical_page_size=4, num_pages=1)


@pytest.mark.parametrize("target_programs", [1, 12, 1000])  # one split, several pages per split, one page each
def test_pallas_gpu_decode_splits_merge_exactly(filled, monkeypatch, target_programs):
    monkeypatch.setattr("pallas_kernels.sparse_decode._GPU_TARGET_PROGRAMS", target_programs)
    cache, _, _ = filled
    stream = np.array([True, False])
    q = jax.random.normal(jax.random.key(target_programs), (B, 4, D))
    scores = pk.page_scores(q, cache.kmin, cache.kmax, cache.page_table, cache.lengths, logical_page_size=LPAGE)
    selected = pk.select_pages(scores, cache.lengths, budget=5 * PAGE, page_size=PAGE)
    args = (q, cache.k_pages, cache.v_pages, cache.page_table, cache.lengths)
    lists = pk.decode_page_lists(cache.page_table, cache.lengths, selected, stream, sink=3, local=20, page_size=PAGE)
    out = _pallas_gpu_decode(*args, lists, jnp.asarray(stream, jnp.int32), _DecodeCfg(3, 20, D**-0.5, PAGE), True)
    ref = pk.sparse_paged_decode_reference(*args, selected, streaming_heads=stream, sink=3, local=20)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_pallas_sparse_paged_decode_empty_slot_gives_zeros(filled):
    # A batch slot with length 0 sees no token: zeros in every implementation; the other rows are unchanged.
    cache, _, _ = filled
    q = jax.random.normal(jax.random.key(5), (B, 4, D))
    lengths = cache.lengths.at[1].set(0)
    stream = np.array([True, False])
    kw = dict(streaming_heads=stream, sink=3, local=20)
    full = pk.sparse_paged_decode_reference(q, cache.k_pages, cache.v_pages, cache.page_table, cache.lengths, None,
                                            **kw)
    args = (q, cache.k_pages, cache.v_pages, cache.page_table, lengths, None)
    lists = pk.decode_page_lists(cache.page_table, lengths, None, stream, sink=3, local=20, page_size=PAGE)
    with pltpu.force_tpu_interpret_mode():
        tpu_mode = pk.sparse_paged_decode(*args, **kw, implementation="pallas")
    outs = {
        "reference": pk.sparse_paged_decode_reference(*args, **kw),
        "xla": jax.jit(lambda *a: pk.sparse_paged_decode(*a, **kw, implementation="xla"))(*args),
        "xla traced pattern": jax.jit(lambda s, *a: pk.sparse_paged_decode(
            *a, streaming_heads=s, sink=3, local=20, implementation="xla"))(jnp.asarray(stream), *args),
        "pallas interpret": pk.sparse_paged_decode(*args, **kw, implementation="pallas", interpret=True),
        "pallas tpu interpret mode": tpu_mode,
        "pallas gpu-style": _pallas_gpu_decode(q, cache.k_pages, cache.v_pages, cache.page_table, lengths, lists,
                                               jnp.asarray(stream, jnp.int32), _DecodeCfg(3, 20, D**-0.5, PAGE), True),
    }
    for name, out in outs.items():
        out = np.asarray(out)
        assert np.isfinite(out).all(), name
        np.testing.assert_array_equal(out[1], 0.0, err_msg=name)
        np.testing.assert_allclose(out[[0, 2]], np.asarray(full)[[0, 2]], atol=2e-5, err_msg=name)
    with pytest.raises(ValueError, match=r"must be in \[0, "):
        pk.sparse_paged_decode(*args[:4], lengths.at[0].set(-1), None, **kw, implementation="xla")


def test_pallas_sparse_paged_decode_ignores_nan_in_padded_slots(filled):
    """NaN / inf in unwritten slots (the tail of each partial last page, spare pool pages) must not reach the
    output: zero weight times NaN is NaN, so every path selects the values away. Output equals the clean one."""
    cache, _, _ = filled
    table = np.asarray(cache.page_table)
    written = np.zeros(cache.k_pages.shape[1:3], bool)  # [pool pages, slots]
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            written[table[b, t // PAGE], t % PAGE] = True
    assert (~written[table[np.arange(B), (LENGTHS - 1) // PAGE]]).any(axis=1).all()  # every last page is partial
    pad = jnp.asarray(~written)[None, :, :, None]
    dirty_k = jnp.where(pad, jnp.inf, cache.k_pages)
    dirty_v = jnp.where(pad, jnp.nan, cache.v_pages)
    stream = np.array([True, False])
    q = jax.random.normal(jax.random.key(7), (B, 4, D))
    scores = pk.page_scores(q, cache.kmin, cache.kmax, cache.page_table, cache.lengths, logical_page_size=LPAGE)
    selected = pk.select_pages(scores, cache.lengths, budget=3 * PAGE, page_size=PAGE)
    kw = dict(streaming_heads=stream, sink=3, local=20)
    lists = pk.decode_page_lists(cache.page_table, cache.lengths, selected, stream, sink=3, local=20, page_size=PAGE)
    cfg = _DecodeCfg(3, 20, D**-0.5, PAGE)

    def run_all(kp, vp):
        args = (q, kp, vp, cache.page_table, cache.lengths, selected)
        return {
            "reference": pk.sparse_paged_decode_reference(*args, **kw),
            "xla": pk.sparse_paged_decode(*args, **kw, implementation="xla"),
            "pallas interpret": pk.sparse_paged_decode(*args, **kw, implementation="pallas", interpret=True),
            "pallas gpu-style": _pallas_gpu_decode(q, kp, vp, cache.page_table, cache.lengths, lists,
                                                   jnp.asarray(stream, jnp.int32), cfg, True),
        }

    clean = np.asarray(pk.sparse_paged_decode_reference(q, cache.k_pages, cache.v_pages, cache.page_table,
                                                        cache.lengths, selected, **kw))
    for name, out in run_all(dirty_k, dirty_v).items():
        out = np.asarray(out)
        assert np.isfinite(out).all(), name
        np.testing.assert_allclose(out, clean, atol=2e-5, rtol=2e-5, err_msg=name)
        if name == "reference":
            np.testing.assert_array_equal(out, clean)
