"""jaxeff.nn, jaxeff.data, jaxeff.train and jaxeff.distributed pieces, checked against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxeff import distributed
from jaxeff.data import CharTokenizer, DigitTask, PasskeyTask, answer_exact_match, english_corpus
from jaxeff.models.llama import Llama, LlamaConfig, SamplingConfig, sample_token
from jaxeff.nn import ContiguousKVCache, attention, xla_attention
from jaxeff.train import OptimConfig, init_train_state, make_optimizer, make_train_step, merge, next_token_loss


def _naive_attention(q, k, v, allowed):
    """Loop-free but head-by-head reference with an explicit boolean mask [B, Sq, Sk]."""
    g = q.shape[2] // k.shape[2]
    k = np.repeat(k, g, axis=2)
    v = np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("impl", ["xla", "dot_product"])
def test_attention_positions_window_and_gqa(impl):
    rng = np.random.default_rng(0)
    b, sq, sk, hq, hkv, d = 2, 5, 9, 4, 2, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)])
    qpos = np.array([[4, 5, 6, 7, 8], [2, 3, 4, 5, 6]])
    kvpos = np.tile(np.arange(sk), (b, 1))
    kvpos[1, 7:] = -1  # empty cache slots
    allowed = (kvpos[:, None] <= qpos[:, :, None]) & (qpos[:, :, None] - kvpos[:, None] < 3) & (kvpos[:, None] >= 0)
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_positions=jnp.asarray(qpos),
                    kv_positions=jnp.asarray(kvpos), sliding_window=3, implementation=impl)
    np.testing.assert_allclose(np.asarray(out), _naive_attention(q, k, v, allowed), atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_dot_product_without_positions_equals_xla(causal):
    # Default positions take the mask-free `is_causal` path of dot_product: it must equal the masked reference.
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(2, 7, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8)])
    ref = attention(q, k, v, causal=causal, implementation="xla")
    out = attention(q, k, v, causal=causal, implementation="dot_product")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
    if causal:  # Sq < Sk keeps the explicit (bottom-right aligned) mask
        np.testing.assert_allclose(np.asarray(attention(q[:, 3:], k, v, implementation="dot_product")),
                                   np.asarray(ref[:, 3:]), atol=2e-5)


def test_attention_rejects_bad_shapes_and_rows_without_keys_are_zero():
    q = jnp.ones((1, 2, 3, 4))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(q, q, q, implementation="magic")
    mask = jnp.zeros((1, 2, 2), bool)
    assert np.all(np.asarray(xla_attention(q, q, q, mask, 0.5)) == 0)


def test_cache_decode_equals_full_forward():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, sliding_window=6, model_type="qwen2",
                      attention_bias=True, layer_types=("full_attention", "sliding_attention"))
    model = Llama(cfg, rngs=nnx.Rngs(3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 12)))
    full = model(tokens)
    cache = ContiguousKVCache.init(2, 2, 16, 1, 8)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    logits, cache = model(tokens[:, :8], pos, cache=cache)
    outs = [logits]
    for t in range(8, 12):
        step, cache = model(tokens[:, t:t + 1], jnp.full((2, 1), t), cache=cache)
        outs.append(step)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)


def test_sampling_respects_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.key(0)
    top_k = np.asarray(sample_token(logits, keys, SamplingConfig(temperature=1.0, top_k=2)))
    assert set(np.unique(top_k)) == {0, 1}
    top_p = np.asarray(sample_token(logits, keys, SamplingConfig(temperature=1.0, top_p=0.7)))
    assert set(np.unique(top_p)) == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    freq = np.mean(top_p == 0)
    assert abs(freq - 0.5 / 0.8) < 0.05
    assert np.all(np.asarray(sample_token(logits, keys, SamplingConfig())) == 0)
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


def test_passkey_examples_are_deterministic_and_well_formed():
    task = PasskeyTask(context=200)
    a, b = task.example(7, 3), task.example(7, 3)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    text = CharTokenizer().decode(a["tokens"])
    key = text[-5:]
    assert key.isdigit() and text.count(key) == 3  # twice in the needle, once as the answer
    assert sum(c.isdigit() for c in text) == 15  # the haystack has no digits
    assert a["loss_mask"].sum() == 5
    assert answer_exact_match(np.roll(a["tokens"], -1)[None], a["tokens"][None], a["loss_mask"][None])[0]
    assert len(english_corpus()) > 300_000
    with pytest.raises(ValueError, match="too short"):
        PasskeyTask(context=50)


def test_digit_task_answers_are_correct():
    prompts, answers = DigitTask("add", 3).sample(np.random.default_rng(0), 64)
    a = prompts[:, :3] @ np.array([100, 10, 1])
    b = prompts[:, 4:7] @ np.array([100, 10, 1])
    np.testing.assert_array_equal(answers @ np.array([1000, 100, 10, 1]), a + b)
    prompts, answers = DigitTask("reverse", 4).sample(np.random.default_rng(1), 8)
    np.testing.assert_array_equal(answers, prompts[:, 1:5][:, ::-1])


def test_train_step_learns_and_respects_frozen_and_post_update():
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, total_steps=30))
    only_norm = nnx.All(nnx.Param, nnx.PathContains("norm"))
    graphdef, state = init_train_state(model, tx, trainable=only_norm)
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    step = make_train_step(graphdef, lambda m, t: (next_token_loss(m(t), t), {}), tx,
                           post_update=lambda p: jax.tree.map(lambda x: jnp.clip(x, 0.0, 1.5), p))
    tokens = jnp.tile(jnp.arange(16), (4, 1))
    losses = []
    for _ in range(30):
        state, metrics = step(state, tokens)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert all(float(x.max()) <= 1.5 for x in jax.tree.leaves(state.params))
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state.frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_lr_schedule_warmup_and_decay():
    from jaxeff.train import lr_schedule

    sched = lr_schedule(OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1))
    assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6 and abs(float(sched(110)) - 0.1) < 1e-6
    assert isinstance(make_optimizer(OptimConfig(grad_clip=None)), optax.GradientTransformation)


def test_cluster_detection_and_mesh():
    assert not distributed.cluster_detected({})
    assert distributed.cluster_detected({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"})
    assert distributed.cluster_detected({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    assert not distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"})
    mesh = distributed.make_mesh()
    assert mesh.shape["data"] == jax.device_count()


@pytest.mark.parametrize("graph_mode", [True, False])
def test_works_with_and_without_nnx_tree_mode(graph_mode):
    from flax import config as flax_config

    from jaxeff.models.llama import generate

    previous = flax_config.nnx_graph_mode
    flax_config.update("nnx_graph_mode", graph_mode)
    try:
        cfg = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2)
        model = Llama(cfg, rngs=nnx.Rngs(0))
        tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, total_steps=5))
        graphdef, state = init_train_state(model, tx)
        step = make_train_step(graphdef, lambda m, t: (next_token_loss(m(t), t), {}), tx)
        state, metrics = step(state, jnp.tile(jnp.arange(8), (2, 1)))
        assert np.isfinite(float(metrics["loss"]))
        assert generate(merge(graphdef, state), [[1, 2, 3]], 4).tokens.shape == (1, 4)
    finally:
        flax_config.update("nnx_graph_mode", previous)


def test_relu_linear_attention_matches_quadratic_formula():
    """The factorised sums against the quadratic form relu(q) relu(k)^T v / rowsum, float64 numpy; cross-attention
    lengths (N != M), values wider than keys, mixed-sign inputs (the ReLU matters), a bfloat16 input."""
    from jaxeff.nn import relu_linear_attention

    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 7, 3, 5)), rng.standard_normal((2, 11, 3, 5))
    v = rng.standard_normal((2, 11, 3, 6))
    w = np.einsum("bnhd,bmhd->bhnm", np.maximum(q, 0), np.maximum(k, 0))
    want = np.einsum("bhnm,bmhe->bnhe", w, v) / (w.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
    got = relu_linear_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), eps=1e-6)
    assert got.dtype == jnp.float32 and got.shape == (2, 7, 3, 6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    half = relu_linear_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), eps=1e-6)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(half), want, rtol=5e-2, atol=5e-2)
    # a query whose ReLU features are all zero meets no key: 0 / eps = 0, not NaN
    zero = relu_linear_attention(-jnp.abs(jnp.asarray(q, jnp.float32)), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_array_equal(np.asarray(zero), 0.0)
    with pytest.raises(ValueError, match="must match"):
        relu_linear_attention(jnp.asarray(q), jnp.asarray(k[:, :, :2]), jnp.asarray(v))


def test_relu_linear_attention_efficientvit_precision():
    """`precision="efficientvit"` as the official `LiteMLA.relu_linear_att`: bfloat16 inputs give bfloat16 matmul
    outputs (V padded with ones, so the normaliser too) divided in float32, emulated here by rounding float32
    products to bfloat16; float16 and float32 inputs are computed exactly as the float32 mode."""
    from jaxeff.nn import relu_linear_attention

    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 9, 2, 8)), rng.standard_normal((2, 13, 2, 8))
    v = rng.standard_normal((2, 13, 2, 4))
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]

    def bf16(a):
        return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))

    qb, kb = (np.maximum(np.asarray(a, np.float32), 0) for a in bf[:2])
    vb = np.asarray(bf[2], np.float32)
    v_pad = np.concatenate([vb, np.ones_like(vb[..., :1])], axis=-1)
    out = bf16(np.einsum("bnhd,bhde->bnhe", qb, bf16(np.einsum("bmhd,bmhe->bhde", kb, v_pad))))
    want = out[..., :-1] / (out[..., -1:] + 1e-15)
    got = relu_linear_attention(*bf, precision="efficientvit")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-2, atol=2e-2)
    f32 = np.asarray(relu_linear_attention(*bf))  # the same bfloat16 inputs, computed in float32
    assert np.abs(np.asarray(got) - f32).max() > 1e-3  # the bfloat16 roundings are there
    assert np.abs(np.asarray(got) - f32).max() < 0.1
    for dtype in (jnp.float16, jnp.float32):
        args = [jnp.asarray(a, dtype) for a in (q, k, v)]
        np.testing.assert_array_equal(np.asarray(relu_linear_attention(*args, precision="efficientvit")),
                                      np.asarray(relu_linear_attention(*args)))
    with pytest.raises(ValueError, match="precision must be"):
        relu_linear_attention(*bf, precision="bf16")


def test_relu_linear_attention_efficientvit_precision_matches_torch_bf16():
    """The official `relu_linear_att` arithmetic in torch bfloat16 (V padded with ones, two bf16 matmuls, then the
    division in float32), its [B, heads, dim, N] layout, against `precision="efficientvit"` on the same inputs."""
    torch = pytest.importorskip("torch")
    from jaxeff.nn import relu_linear_attention

    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 37, 3, 16)).astype(np.float32) for _ in range(3))
    got = np.asarray(relu_linear_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)),
                                           precision="efficientvit"))
    tq, tk, tv = (torch.from_numpy(a).permute(0, 2, 3, 1).to(torch.bfloat16) for a in (q, k, v))  # [B, h, d, N]
    tq, tk = torch.relu(tq), torch.relu(tk)
    tv = torch.nn.functional.pad(tv, (0, 0, 0, 1), mode="constant", value=1)
    out = torch.matmul(torch.matmul(tv, tk.transpose(-1, -2)), tq).float()
    want = (out[:, :, :-1] / (out[:, :, -1:] + 1e-15)).permute(0, 3, 1, 2).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_glu_mbconv_and_depthwise_conv_match_direct_convs():
    """The shared GLU-MBConv core (1x1 matmuls, shifted-sum depthwise, glu_silu) against XLA's direct convs;
    odd map size, biases on and off; both depthwise implementations against the grouped conv."""
    from jaxeff.nn import depthwise_conv, glu_mbconv

    rng = np.random.default_rng(1)
    b, h, w, c, f, cout = 2, 5, 7, 6, 4, 3
    arr = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)
    x, wi, bi, wd, bd, wp, bp = arr(b, h, w, c), arr(1, 1, c, 2 * f), arr(2 * f), arr(3, 3, 1, 2 * f), arr(2 * f), \
        arr(1, 1, f, cout), arr(cout)

    def conv(x, k, groups=1):
        p = k.shape[0] // 2
        return jax.lax.conv_general_dilated(x, k, (1, 1), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups, precision="highest")

    y = conv(jax.nn.silu(conv(x, wi) + bi), wd, groups=2 * f) + bd
    want = conv(y[..., :f] * jax.nn.silu(y[..., f:]), wp) + bp
    np.testing.assert_allclose(glu_mbconv(x, wi, bi, wd, bd, wp, bp), want, rtol=1e-5, atol=1e-5)
    no_bias = conv(jax.nn.silu(conv(x, wi)), wd, groups=2 * f)
    np.testing.assert_allclose(glu_mbconv(x, wi, None, wd, None, wp),
                               conv(no_bias[..., :f] * jax.nn.silu(no_bias[..., f:]), wp), rtol=1e-5, atol=1e-5)
    for k in (3, 5):
        wk = arr(k, k, 1, c)
        for impl in ("shifted", "xla", None):
            np.testing.assert_allclose(depthwise_conv(x, wk, implementation=impl), conv(x, wk, groups=c),
                                       rtol=1e-5, atol=1e-5, err_msg=f"k={k} {impl}")
    with pytest.raises(ValueError, match="odd k"):
        depthwise_conv(x, arr(2, 2, 1, c))
    with pytest.raises(ValueError, match="glu_mbconv weights"):
        glu_mbconv(x, wi, bi, wd[..., :-1], bd, wp)


@pytest.mark.parametrize("prompts, match", [
    ([], "list of token-id lists"), ([1, 2, 3], "list of token-id lists"), ([[1], []], "at least one token"),
    ([[1, 2], [3, 100]], "token id 100 in prompt 1 is outside the vocabulary"),
    ([[-1]], "token id -1 in prompt 0"), ("hello", "list of token-id lists"), ([[1.0, 2.0]], "prompt 0 holds float64"),
    (np.array([1, 2]), r"prompt array must be \[batch, length\]"),
])
def test_bad_prompts_are_named(prompts, match):
    from jaxeff.models.llama import pad_prompts

    with pytest.raises(ValueError, match=match):
        pad_prompts(prompts, vocab_size=100)
    tokens, lengths = pad_prompts([[1, 2, 3], [4]], multiple=4, vocab_size=100)
    assert tokens.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]] and lengths.tolist() == [3, 1]
    tokens, lengths = pad_prompts(np.array([[5, 6], [7, 8]]), vocab_size=100)  # an id array: equal lengths
    assert tokens.tolist() == [[5, 6], [7, 8]] and lengths.tolist() == [2, 2]
