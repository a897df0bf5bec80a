"""Tensor-parallel decoders (`jaxeff.models.sharding`) on 8 CPU devices: the sharded model gives the one-device
tokens and logits through `jaxeff.models.llama.generate`, `jaxeff.duo_attention.generate`, the LServe engine and a
jitted forward,
its parameters and caches really are split, and a mesh the heads cannot use is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from jaxeff import duo_attention as da
from jaxeff.distributed import make_mesh
from jaxeff.lserve import Engine, LServeCache, LServeConfig
from jaxeff.models import sharding as tp
from jaxeff.models.gemma2 import Gemma2, Gemma2Config
from jaxeff.models.llama import Llama, LlamaConfig, generate
from jaxeff.nn import ContiguousKVCache

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/multidevice conftest)")

PROMPTS = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 11, 30, 17], [3, 1, 4, 1, 5, 9, 2, 6]]
# Qwen2 (q/k/v biases) with 8 KV heads (split over 8 devices) and a Llama with 2 (replicated on 8)
QWEN = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=8, model_type="qwen2", attention_bias=True)
LLAMA = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)


def _spec(x):
    return x.sharding.spec


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((8,), ("model",))


@pytest.fixture(scope="module")
def qwen_pair(mesh):
    """(one-device model, the same weights sharded on 8 devices)."""
    return Llama(QWEN, rngs=nnx.Rngs(1)), tp.shard_model(Llama(QWEN, rngs=nnx.Rngs(1)), mesh)


def test_parameters_are_split(qwen_pair, mesh):
    _, model = qwen_pair
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    model_axis = PartitionSpec(None, "model")
    assert _spec(attn.q_proj.kernel[...]) == model_axis and _spec(attn.k_proj.kernel[...]) == model_axis
    assert _spec(attn.q_proj.bias[...]) == PartitionSpec("model")
    assert _spec(attn.o_proj.kernel[...]) == PartitionSpec("model", None)
    assert _spec(mlp.down_proj.kernel[...]) == PartitionSpec("model", None)
    assert _spec(model.embed_tokens.embedding[...]) == PartitionSpec("model", None)
    assert _spec(model.lm_head.kernel[...]) == model_axis
    assert attn.q_proj.kernel[...].addressable_shards[0].data.shape == (64, 64 // 8)
    cache = tp.init_cache(lambda: model.init_cache(2, 32), model)  # built in its shards
    assert _spec(cache.v[1]) == PartitionSpec(None, None, "model", None)
    assert cache.v[1].addressable_shards[0].data.shape == (2, 32, 1, 8)
    one_device = tp.init_cache(lambda: qwen_pair[0].init_cache(2, 32), qwen_pair[0])
    assert len(one_device.k[0].sharding.device_set) == 1
    params = nnx.state(model, nnx.Param)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    norms = 5 * 64 * 4  # 2 per layer + final, replicated
    assert tp.per_device_nbytes(params) - norms == (total - norms) // 8


def test_kv_heads_fewer_than_devices_are_replicated(mesh):
    model = tp.shard_model(Llama(LLAMA, rngs=nnx.Rngs(0)), mesh)
    attn = model.layers[0].self_attn
    assert _spec(attn.k_proj.kernel[...]) == PartitionSpec() and _spec(attn.q_proj.kernel[...]) == PartitionSpec(
        None, "model")
    cache = tp.init_cache(lambda: model.init_cache(2, 32), model)
    assert _spec(cache.k[0]) == PartitionSpec() and len(cache.k[0].sharding.device_set) == 8


def test_llama_generate_sharded_equals_one_device(mesh):
    one = Llama(LLAMA, rngs=nnx.Rngs(0))
    ref = generate(one, PROMPTS, 6)
    out = generate(tp.shard_model(Llama(LLAMA, rngs=nnx.Rngs(0)), mesh), PROMPTS, 6)
    np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_jitted_forward_logits_match(qwen_pair):
    one, sharded = qwen_pair
    tokens = jnp.asarray([PROMPTS[0][:8], PROMPTS[1][:8]])

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    graphdef, state = nnx.split(one)
    ref = forward(state, tokens)
    out = forward(nnx.state(sharded), tokens)
    assert _spec(out) == PartitionSpec(None, None, "model")  # logits stay split over the vocabulary
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_duo_attention_generate_sharded_equals_one_device(qwen_pair, mesh):
    one, sharded = qwen_pair
    heads = np.zeros((2, 8), bool)
    heads[0, [0, 2, 5]] = True  # 3 retrieval heads: cache split over the sequence
    heads[1] = True  # 8: split over heads
    kw = dict(retrieval_heads=heads, sink=2, recent=4, chunk_size=8, max_len=32)
    ref = da.generate(one, PROMPTS, 5, **kw)
    out = da.generate(sharded, PROMPTS, 5, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert out.kv_nbytes == ref.kv_nbytes
    cache = tp.shard_cache(da.DualKVCache.init(heads, 2, 32, 8, sink=2, recent=4), mesh)
    assert [_spec(x) for x in cache.full_k] == [PartitionSpec(None, "model", None, None),
                                                PartitionSpec(None, None, "model", None)]
    assert _spec(cache.ring_k[0]) == PartitionSpec()


def test_lserve_engine_sharded_equals_one_device(qwen_pair, mesh, monkeypatch):
    """Layer 0: 8 retrieval heads (pool split by heads, page selection and decode per device under shard_map);
    layer 1: 5 retrieval + 3 streaming heads (pools replicated). Dense prefill per device in two chunks (the second
    reads the first from the pools); contexts past the budget and the window."""
    one, sharded = qwen_pair
    streaming = np.zeros((2, 8), bool)
    streaming[1, [1, 4, 6]] = True
    cfg = LServeConfig(max_len=48, page_size=8, logical_page_size=4, token_budget=24, sink=4, local=8,
                       prefill_chunk=16)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 96, n).tolist() for n in (30, 17)]
    ref = Engine(one, cfg, streaming_heads=streaming).generate(prompts, 6)
    per_device = []  # shard_map calls traced for the sharded engine: its kernels run per device, not whole
    real_shard_map = jax.shard_map
    monkeypatch.setattr(jax, "shard_map", lambda f, **kw: per_device.append(kw["mesh"].size) or real_shard_map(f, **kw))
    out = Engine(sharded, cfg, streaming_heads=streaming).generate(prompts, 6)
    assert per_device and set(per_device) == {8}
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert [st["kv_pages_read"] for st in out.stats] == [st["kv_pages_read"] for st in ref.stats]
    cache = tp.init_cache(lambda: LServeCache.init(streaming, 2, 8, cfg, mesh=mesh), sharded)
    assert [_spec(p.k_pages) for p in cache.retrieval_pools] == [PartitionSpec("model", None, None, None),
                                                                 PartitionSpec()]
    assert _spec(cache.streaming_pools[1].v_pages) == PartitionSpec()
    assert cache.retrieval_pools[0].kmin.addressable_shards[0].data.shape[0] == 1
    assert _spec(cache.retrieval_pools[0].page_table) == PartitionSpec() and _spec(cache.selected[0]) == PartitionSpec()
    # A sparse prefill runs per device only where every device gets the same streaming flags (a static schedule)
    assert cache._device_flags(np.zeros(8, bool)).tolist() == [False]
    assert cache._device_flags(np.array([True, False] * 4)) is None  # stays whole under GSPMD
    assert cache._device_flags(np.array([True, True])).tolist() == [True]  # 2 KV heads, each on 4 devices
    assert cache._device_flags(np.array([True, False])) is None


def test_shard_map_attention_fn_runs_pallas_per_shard(qwen_pair, mesh):
    one, sharded = qwen_pair
    tokens = jnp.asarray([PROMPTS[0][:8]])
    ref = one(tokens)
    out = jax.jit(lambda m, t: m(t, attention_fn=tp.attention_fn(mesh, implementation="pallas")))(sharded, tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


@pytest.mark.parametrize("n,kw,match", [
    (8, dict(num_attention_heads=12, num_key_value_heads=4), "attention heads"),
    (4, dict(num_attention_heads=12, num_key_value_heads=3), "key/value heads"),
    (8, dict(intermediate_size=100), "intermediate_size"),
])
def test_bad_mesh_is_refused(n, kw, match):
    cfg = LlamaConfig(**{**dict(vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=8, num_key_value_heads=8), **kw})
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=match):
        tp.param_specs(model, n)
    with pytest.raises(ValueError, match="not 'tensor'"):
        tp.shard_model(model, make_mesh((1,), ("model",)), axis="tensor")


def test_gemma2_sharded_logits_match(mesh):
    """Tied embeddings split over the vocabulary, 2 KV heads replicated on 8 devices, windows and soft-caps."""
    cfg = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=4)
    one = Gemma2(cfg, rngs=nnx.Rngs(0))
    specs = tp.param_specs(one, 8)
    assert specs[("embed_tokens", "embedding")] == PartitionSpec("model", None)
    assert specs[("layers", 0, "pre_feedforward_layernorm", "weight")] == PartitionSpec()
    assert specs[("layers", 0, "self_attn", "v_proj", "kernel")] == PartitionSpec()
    tokens = jnp.asarray([PROMPTS[0][:10]])
    forward = jax.jit(lambda m, t: m(t))
    ref = forward(one, tokens)
    out = forward(tp.shard_model(Gemma2(cfg, rngs=nnx.Rngs(0)), mesh), tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_llama3_8b_per_device_bytes():
    """Llama-3-8B in bfloat16 on 8 devices, from abstract arrays only: a 32K dense cache and a half-streaming
    DuoAttention one."""
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)
    mesh8 = AbstractMesh((8,), ("model",), axis_types=(AxisType.Auto,))
    params = tp.abstract_model(cfg, mesh8)
    n_params = sum(int(np.prod(x.shape)) for x in params.values())
    assert n_params == 8_030_261_248  # Meta-Llama-3-8B
    replicated = 65 * 4096 * 2  # RMSNorm weights
    assert tp.per_device_nbytes(params) == (n_params * 2 - replicated) // 8 + replicated
    dense = tp.abstract_cache(lambda: ContiguousKVCache.init(32, 1, 32768, 8, 128, jnp.bfloat16), mesh8)
    assert tp.per_device_nbytes(dense) == 32 * 2 * 32768 * 8 * 128 * 2 // 8  # 512 MiB of 4 GiB
    heads = np.zeros((32, 8), bool)
    heads[:, :4] = True
    duo = tp.abstract_cache(lambda: da.DualKVCache.init(heads, 1, 32768, 128, sink=64, recent=256,
                                                        dtype=jnp.bfloat16), mesh8)
    ring = 32 * (2 * 320 * 4 * 128 * 2 + 320 * 4)  # replicated rings and slot positions
    assert tp.per_device_nbytes(duo) == 32 * 2 * 32768 * 4 * 128 * 2 // 8 + ring
