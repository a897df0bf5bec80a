"""LServe engine: exactness against the plain decoder, page accounting, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
from jaxeff.lserve import Engine, LServeCache, LServeConfig, ring_page_table
from jaxeff.models.llama import Llama, LlamaConfig
from jaxeff.models.llama import generate as dense_generate

NEW = 8


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
    out = Engine(model, small(dynamic_sparsity=False)).generate(prompts, NEW)
    np.testing.assert_array_equal(out.tokens, ref)
    st = out.stats[1]
    assert st["prompt_tokens"] == 20 and st["decode_steps"] == NEW - 1
    # Dense decode reads every live page of every head: whole pages, so at least the dense token bytes.
    assert st["kv_bytes_per_step"] >= st["dense_kv_bytes_per_step"]


def test_engine_equals_dense_when_budget_and_window_cover_everything(setup):
    model, prompts, ref = setup
    streaming = np.array([[False, True], [True, False]])
    out = Engine(model, small(local=64, reselect_every=3), streaming_heads=streaming).generate(prompts, NEW)
    np.testing.assert_array_equal(out.tokens, ref)


def test_sparse_engine_reads_budget_pages(setup):
    model, prompts, _ = setup
    cfg = small(token_budget=16, reselect_every=4)
    streaming = np.array([[False, True], [True, False]])
    out = Engine(model, cfg, streaming_heads=streaming).generate(prompts, NEW)
    assert out.tokens.shape == (3, NEW)
    for st, length in zip(out.stats, (37, 20, 50)):
        steps = st["decode_steps"]
        # Per step and layer: one retrieval head reads <= budget pages + the newest, one streaming head reads
        # its sink page and at most (local - 1) // page + 2 local pages.
        assert st["kv_pages_read"] <= steps * 2 * ((16 // 8 + 1) + (1 + 2))
        assert st["kv_bytes_per_step"] < (0.75 if length == 50 else 1.0) * st["dense_kv_bytes_per_step"], st


def test_ring_page_table_maps_local_pages_to_distinct_slots():
    table = ring_page_table(2, 10, n_sink=1, n_ring=3)
    assert table[0].tolist() == [0, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert table[1].min() == 4


def test_clear_errors(setup):
    model, prompts, _ = setup
    with pytest.raises(ValueError, match="smaller than one page"):
        small(token_budget=4)
    with pytest.raises(ValueError, match="longer than the cache"):
        Engine(model, small(max_len=40)).generate(prompts, NEW)
    with pytest.raises(ValueError, match="pattern belongs to another model"):
        Engine(model, small(), streaming_heads=np.zeros((32, 8), bool))


def test_streaming_ring_prefill_and_decode_equal_lambda_attention(setup):
    """Streaming heads with a ring much smaller than the prompt, prefilled in chunks larger than the ring, then
    decoded: every logit equals the one-shot forward with hybrid (Λ) attention."""
    model, _, _ = setup
    cfg = small(sink=4, local=8, prefill_chunk=24, dynamic_sparsity=False)
    streaming = np.array([[True, False], [False, True]])
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 51)))
    graphdef, state = nnx.split(model)

    def hybrid(layer, q, k, v, *, q_positions, kv_positions):
        return pallas_kernels.hybrid_attention(q, k, v, streaming_heads=streaming[layer], sink=4, local=8)

    ref = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, attention_fn=hybrid))(state, tokens)
    step = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, p, cache=c))
    cache = LServeCache.init(streaming, 2, model.config.head_dim, cfg)
    outs = []
    for start in (0, 24):
        pos = jnp.broadcast_to(jnp.arange(start, start + 24), (2, 24))
        logits, cache = step(state, tokens[:, start:start + 24], pos, cache.replace(prefill_offset=start))
        outs.append(logits)
    cache = cache.replace(prefill_offset=-1)
    for p in range(48, 51):
        logits, cache = step(state, tokens[:, p:p + 1], jnp.full((2, 1), p), cache)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(ref), atol=2e-5)


def test_engine_stops_at_any_of_several_stop_ids(setup):
    model, prompts, free = setup
    stops = (int(free[0, 2]), int(free[1, 1]))  # row 0 stops at its third token at the latest, row 1 at its second
    ref = dense_generate(model, prompts, NEW, eos_id=stops, pad_id=63)
    assert ref.num_generated[0] <= 3 and ref.num_generated[1] <= 2
    out = Engine(model, small(dynamic_sparsity=False)).generate(prompts, NEW, eos_id=list(stops), pad_id=63)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.num_generated, ref.num_generated)
