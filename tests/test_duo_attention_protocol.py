"""DuoAttention's official rules: deployment windows and evaluation protocols against masked dense references,
the gate-training mask, schedule and clamp gradients, tie-breaking and the calibration data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
from jaxeff import duo_attention as da
from jaxeff.data.text import CharTokenizer
from jaxeff.models.llama import Llama, LlamaConfig
from jaxeff.nn import xla_attention

S, R = 3, 5
HEADS = np.array([[True, False], [False, True]])  # retrieval KV heads per layer


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return Llama(cfg, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def reference(model):
    """Jitted logits [1, T] of the model where streaming heads see, at query p, causal keys k < S or
    k >= seg[p] - R (window "official": seg[p] = start of p's prefill chunk or decode step) or p - k < R ("token")."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(tokens, seg, token_window):
        t = tokens.shape[1]
        p, k = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        causal = k <= p
        window = jnp.where(token_window, p - k < R, k >= seg[:, None] - R)
        stream_mask = causal & ((k < S) | window)

        def fn(layer, q, k_, v, *, q_positions, kv_positions):
            scale = q.shape[-1] ** -0.5
            dense, stream = (xla_attention(q, k_, v, m[None], scale) for m in (causal, stream_mask))
            streaming_q = np.repeat(~HEADS[layer], q.shape[2] // k_.shape[2])
            return jnp.where(streaming_q[None, None, :, None], stream, dense)

        return nnx.merge(graphdef, state)(tokens, attention_fn=fn)

    def greedy(prompt, new, seg_prompt, token_window=False):
        n = len(prompt) + new
        toks = np.zeros((1, n), np.int32)
        toks[0, : len(prompt)] = prompt
        seg = np.concatenate([seg_prompt, np.arange(len(prompt), n)])  # generated tokens: one decode step each
        for i in range(new):
            logits = run(jnp.asarray(toks), jnp.asarray(seg), token_window)
            toks[0, len(prompt) + i] = int(jnp.argmax(logits[0, len(prompt) + i - 1]))
        return toks[0, len(prompt):]

    return greedy


def _prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 64, n).tolist() for n in (41, 29)]


def _segments(length, chunk, sim=0):
    """Segment start of every prompt position: chunks of `chunk` over the first length - sim tokens (0 = one
    chunk), then one decode step per simulated token."""
    dense = length - sim
    chunk = dense if chunk == 0 else chunk
    return np.concatenate([np.arange(dense) // chunk * chunk, np.arange(dense, length)])


@pytest.mark.parametrize("protocol,kw", [("longbench", dict(decode_simulation=7)), ("niah", dict(chunk_size=16)),
                                         ("efficiency", dict(chunk_size=16)), (None, dict(chunk_size=12))])
def test_protocols_equal_masked_dense_reference(model, reference, protocol, kw):
    prompts = _prompts()
    new = 5
    out = da.generate(model, prompts, new, retrieval_heads=HEADS, sink=S, recent=R, protocol=protocol, **kw)
    preset = da.PROTOCOLS.get(protocol, {})
    chunk = kw.get("chunk_size", preset.get("chunk_size"))
    sim = kw.get("decode_simulation", preset.get("decode_simulation", 0))
    for row, prompt in enumerate(prompts):
        ref = reference(prompt, new, _segments(len(prompt), chunk, sim), protocol == "efficiency")
        np.testing.assert_array_equal(out.tokens[row], ref, err_msg=f"{protocol} row {row}")


def test_longbench_prefill_is_dense_and_decode_window_is_sink_recent_plus_one(model):
    """One-chunk prefill under the official window equals the dense model for every head; a decode step's streaming
    head reads exactly sink + recent cached keys + its own (S + R + 1), the token window one fewer."""
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 30)))
    graphdef, state = nnx.split(model)
    cache = da.DualKVCache.init(HEADS, 2, 31, model.config.head_dim, sink=S, recent=R)
    both = jax.jit(lambda st, t, c: (nnx.merge(graphdef, st)(t, jnp.broadcast_to(jnp.arange(30), (2, 30)), cache=c)[0],
                                     nnx.merge(graphdef, st)(t)))
    cached, dense = both(state, tokens, cache)
    np.testing.assert_allclose(cached, dense, atol=2e-5)

    # Layer level: 30 prefilled tokens, then a decode query at position 30, KV head 0 streaming.
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.normal(size=(1, n, h, 8)), jnp.float32) for n, h in ((30, 2), (30, 1), (30, 1)))
    mask = np.array([[False]])
    for window, keys in (("official", list(range(S)) + list(range(30 - R, 31))),
                         ("token", list(range(S)) + list(range(31 - R, 31)))):
        qd, kd, vd = (jnp.asarray(rng.normal(size=(1, 1, h, 8)), jnp.float32) for h in (2, 1, 1))

        @jax.jit
        def prefill_then_decode(c, qd, kd, vd):
            _, c = c.attend(0, q, k, v, jnp.arange(30)[None])
            return c.attend(0, qd, kd, vd, jnp.array([[30]]))[0]

        out = prefill_then_decode(da.DualKVCache.init(mask, 1, 31, 8, sink=S, recent=R, window=window), qd, kd, vd)
        k_all, v_all = jnp.concatenate([k, kd], 1), jnp.concatenate([v, vd], 1)
        ref = xla_attention(qd, k_all[:, keys], v_all[:, keys], jnp.ones((1, 1, len(keys)), bool), 8 ** -0.5)
        np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=window)
    assert len(keys) == S + R  # the token window's count; the official one was S + R + 1


def test_generate_bad_protocol_arguments(model):
    for kw, match in [(dict(protocol="ruler"), "protocol must be one of"), (dict(window="exact"), "window must be"),
                      (dict(protocol="longbench"), "not longer than decode_simulation=50"),
                      (dict(chunk_size=-1), r"chunk_size .*>= 0")]:
        with pytest.raises(ValueError, match=match):
            da.generate(model, [[1] * 20], 2, retrieval_heads=HEADS, sink=S, recent=R, **kw)


def test_gate_schedule_is_the_official_lambda():
    sched = da.gate_schedule(da.GateTrainConfig())  # 2000 steps, lr 0.02
    official = lambda s: min(1, max((s + 1) / 400, 0.1), max((2000 - s) / 400, 0.1))
    for s, mult in [(0, 0.1), (39, 0.1), (100, 0.2525), (399, 1.0), (1600, 1.0), (1601, 0.9975), (1960, 0.1),
                    (1999, 0.1)]:
        assert official(s) == pytest.approx(mult)
        assert float(sched(s)) == pytest.approx(0.02 * mult, rel=1e-6)


def test_gate_clamp_and_abs_have_torch_gradients():
    x = jnp.array([-0.1, 0.0, 0.5, 1.0, 1.2])
    np.testing.assert_array_equal(jax.grad(lambda x: da.torch_clamp01(x).sum())(x), [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(jax.grad(lambda x: da.torch_abs(x).sum())(x), [-1, 0, 1, 1, 1])
    assert float(jax.grad(lambda x: jnp.clip(x, 0, 1))(1.0)) == 0.5  # why: jnp.clip halves it on the bound
    # Gates start on the bound 1: the mixing weight passes the full gradient to them.
    from jaxeff.duo_attention.training import group_gates

    w = jnp.arange(1.0, 5.0)
    np.testing.assert_allclose(jax.grad(lambda g: (group_gates(g, 4) * w).sum())(jnp.ones(2)), [3.0, 7.0])


def test_two_way_student_uses_the_block_mask_by_default():
    cfg = da.GateTrainConfig(sink=4, recent=8, mask_block=4)
    assert da.GateTrainConfig().window_block == 128 and da.GateTrainConfig(streaming_mask="token").window_block == 1
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 26, h, 8)), jnp.float32) for h in (4, 2, 2))
    pos = jnp.broadcast_to(jnp.arange(26), (2, 26))
    fn = da.two_way_attention_fn(jnp.zeros((1, 2)), sink=cfg.sink, recent=cfg.recent, window_block=cfg.window_block)
    out = jax.jit(lambda q, k, v: fn(0, q, k, v, q_positions=pos, kv_positions=pos))(q, k, v)
    ref = pk.hybrid_attention_reference(q[1:], k[1:], v[1:], streaming_heads=[True, True], sink=4, local=8,
                                        window_block=4)
    np.testing.assert_allclose(out[1:], ref, atol=1e-5)  # gates 0: the student is all streaming
    token = pk.hybrid_attention_reference(q[1:], k[1:], v[1:], streaming_heads=[True, True], sink=4, local=8)
    assert float(jnp.abs(token - ref).max()) > 1e-3
    with pytest.raises(ValueError, match="streaming_mask"):
        da.GateTrainConfig(streaming_mask="sdpa")


def test_gate_step_clamps_at_the_start_and_keeps_model_dtype(model):
    """A step clamps the incoming gates, then updates without clamping (the official order); gate_dtype="model"
    keeps bf16 gates and moments."""
    m = nnx.clone(model)
    tokens = np.random.default_rng(0).integers(0, 64, (1, 16))
    batch = {"tokens": tokens, "mask": np.ones((1, 16), np.float32)}
    cfg = da.GateTrainConfig(sink=2, recent=4, mask_block=2, lr=0.5)  # 2000 steps: multiplier 0.1 at step 0
    init, step = da.make_gate_step(m, cfg)
    gates = jnp.array([[1.7, -0.4], [0.5, 1.0]])
    new, _, _ = step(gates, init(gates), batch)
    clamped = jnp.clip(gates, 0, 1)
    graphdef, state = nnx.split(m)
    grads = jax.jit(jax.grad(lambda g, st: da.gate_loss(g, nnx.merge(graphdef, st), jnp.asarray(tokens),
                                                        jnp.asarray(batch["mask"]), sink=2, recent=4, reg_weight=0.05,
                                                        window_block=2)[0]))(clamped, state)
    # AdamW's first step from the clamped gates is lr * multiplier(0) = 0.05 against the gradient's sign; the
    # result is left unclamped (gate [0, 1] may go below 0).
    np.testing.assert_allclose(new, clamped - 0.05 * jnp.sign(grads), atol=1e-5)
    assert (np.asarray(grads) != 0).all()
    mb = Llama(m.config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    init, step = da.make_gate_step(mb, da.GateTrainConfig(sink=2, recent=4, steps=4, mask_block=2,
                                                          gate_dtype="model"))
    g = jnp.ones((2, 2), jnp.bfloat16)
    new, opt_state, _ = step(g, init(g), batch)
    assert new.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(opt_state[0].mu))


def test_head_selection_tie_breaking_is_seeded_and_reported():
    alpha = np.array([[1.0, 1.0, 1.0, 0.2], [1.0, 0.3, 0.1, 0.0]])  # 4 heads tied at 1.0 for 3 slots at 0.625
    a, b = (da.select_retrieval_heads(alpha, 0.625, seed=s) for s in (42, 42))
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 3 and a[alpha < 1].sum() == 0
    np.random.seed(42)  # the official draw: the global stream after seed_everything(42)
    noisy = alpha + np.random.uniform(0, 1e-6, alpha.shape)
    np.testing.assert_array_equal(a, noisy >= np.quantile(noisy, 0.625))
    picks = {tuple(np.flatnonzero(da.select_retrieval_heads(alpha, 0.625, seed=s))) for s in range(20)}
    assert len(picks) > 1  # the tied set is noise-decided
    assert da.selection_ties(alpha, a) == {"boundary": 1.0, "tied": 4, "kept": 3, "noise_decided": True}
    clear = da.select_retrieval_heads(alpha, 0.25)
    assert not da.selection_ties(alpha, clear)["noise_decided"]
    # Raw gates slightly below 0 (released TSVs) are clipped first.
    np.testing.assert_array_equal(da.select_retrieval_heads(alpha - 0.001 * (alpha == 0), 0.625, seed=42), a)


def test_calibration_data_follows_the_official_recipe():
    cfg = da.CalibrationConfig(context_min=1000, context_max=4000, context_intervals=4, num_passkeys=3,
                               passkey_length=5, depth_intervals=50)
    data = da.MultiPasskeyData(CharTokenizer(), config=cfg)
    assert len(data) == 4 and list(data.lengths) == [1000, 2000, 3000, 4000]
    ex = data.example(1, np.random.default_rng(0))
    tok = CharTokenizer()
    text = tok.decode(ex["tokens"])
    assert ex["tokens"].size % 16 == 0 and ex["tokens"][0] == tok.bos_id
    assert text.startswith("<|im_start|> This is a very long story book: <book> ")
    keys = [tok.decode(k) for k in ex["passkeys"]]
    assert all(len(k.split()) == 5 and set(k.split()) <= set(da.calibration.NATO) for k in keys)
    positions = [text.index(f"it's the {o} passkey to the vault: {k}") for o, k in zip(("first", "second", "third"),
                                                                                       keys)]
    assert positions == sorted(positions) and np.all(np.diff(ex["depths"]) > 0)
    labelled = tok.decode(ex["tokens"][ex["mask"] > 0])
    assert labelled == "".join(f"Based on the content of the book, what is the {o} passkey to the vault?\n"
                               f"Passkey: {k}\n\n" for o, k in zip(("first", "second", "third"), keys))
    assert text[: -len(labelled)].endswith(" </book>.\n\n")
    batch = next(data.batches(seed=1))
    assert batch["tokens"].shape == batch["mask"].shape and batch["tokens"].shape[0] == 1
    with pytest.raises(ValueError, match="no room"):
        da.MultiPasskeyData(CharTokenizer(), config=da.CalibrationConfig(context_min=100, context_max=500))
