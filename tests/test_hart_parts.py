"""HART building blocks: resampling parity with torch, tokenizer identities, diffusion sampler, transformer cache,
multi-iteration MAR, condition dropout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.hart import diffusion as diff
from jaxeff.hart.chunks import even_chunk
from jaxeff.hart.loading import with_dtype
from jaxeff.hart.pipeline import largest_batch
from jaxeff.hart.tokenizer import HARTTokenizer, TokenizerConfig
from jaxeff.hart.train import ClassConditionedHART, drop_condition, hart_loss, psnr
from jaxeff.hart.transformer import (
    MIN_Q_CHUNK,
    HARTConfig,
    HARTTransformer,
    SampleOptions,
    cfg_ramp,
    filter_logits,
    generate_fhat,
    generate_fhat_jit,
    maskgit_schedule,
    query_chunk,
    sample_keep_mask,
    scale_coords,
)
from jaxeff.nn.resample import resize

TOK = TokenizerConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                      patch_nums=(1, 2, 3, 4))
TR = HARTConfig(embed_dim=32, depth=2, num_heads=2, context_token=3, context_dim=12, vocab_size=64, cvae=8,
                patch_nums=(1, 2, 3, 4), diff_width=32, diff_depth=2, num_sampling_steps=4)


def _randomize(module, seed, std=0.3):
    """Replace every parameter by N(0, std^2): the default init makes blocks near-identity (adaLN gamma 1e-5),
    which would hide attention bugs."""
    g, st = nnx.split(module)
    leaves, tdef = jax.tree.flatten(st)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return nnx.merge(g, jax.tree.unflatten(tdef, [jax.random.normal(k, x.shape) * std for k, x in zip(keys, leaves)]))


@pytest.fixture(scope="module")
def tok():
    return HARTTokenizer(TOK, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
    return _randomize(HARTTransformer(TR, rngs=nnx.Rngs(1)), 5)


@pytest.mark.parametrize("mode,n_in,n_out", [("bicubic", 3, 7), ("bicubic", 2, 16), ("area", 16, 5), ("area", 7, 3)])
def test_resize_matches_torch(mode, n_in, n_out):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, n_in, n_in, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(n_out, n_out), mode=mode)
    np.testing.assert_allclose(np.asarray(resize(jnp.asarray(x), n_out, mode)), ref.permute(0, 2, 3, 1).numpy(),
                               atol=1e-5)


def test_tokenizer_residual_identity_and_roundtrip(tok):
    img = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    f = tok.encode(img)
    assert f.shape == (2, 4, 4, 8)
    idx, resid, f_hat = tok.quantize.encode_hybrid(f)
    assert [i.shape for i in idx] == [(2, p * p) for p in TOK.patch_nums]
    last = tok.quantize.lookup(idx[-1], 4)
    # discrete sum + continuous residual == latent
    np.testing.assert_allclose(f_hat + (resid - last), f, atol=1e-5)
    # the sum rebuilt from the indices alone equals the quantizer's own running sum
    np.testing.assert_allclose(tok.quantize.idx_to_fhat(idx), f_hat, atol=1e-5)
    # codes of a latent that is exactly representable come back unchanged (round trip through the codebook)
    idx2, resid2, f_hat2 = tok.quantize.encode_hybrid(f_hat)
    np.testing.assert_allclose(tok.quantize.idx_to_fhat(idx2), f_hat2, atol=1e-5)
    rec_true = tok.decode(f)
    assert rec_true.shape == img.shape and float(jnp.abs(rec_true).max()) <= 1.0


def test_scale_schedule_shapes(tok):
    full = HARTConfig()
    assert full.num_image_tokens == 9451 and full.seq_len == 9750 and full.ffn_hidden == 4096
    assert scale_coords(full.patch_nums, 13).shape == (64 * 64, 2)
    np.testing.assert_allclose(scale_coords(full.patch_nums, 1)[-1], [32.0, 32.0])  # normalised to the 64 grid
    idx, _, _ = tok.quantize.encode_hybrid(tok.encode(jnp.zeros((1, 16, 16, 3))))
    assert tok.quantize.teacher_forcing_input(idx).shape == (1, TR.num_image_tokens - 1, 8)
    assert [TokenizerConfig().phi_index(s) for s in (0, 13)] == [0, 3]


def test_cfg_ramp():
    r = cfg_ramp(4.5, 14)
    np.testing.assert_allclose(r[:13], 4.5 * np.arange(13) / 13)
    assert r[0] == 0 and r[-1] == r[-2]


def test_filter_logits_topk_topp():
    lg = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isinf(np.asarray(filter_logits(lg, 2, 0.0))).tolist() == [[False, False, True, True]]
    assert np.isinf(np.asarray(filter_logits(lg, 0, 0.7))).tolist() == [[False, False, True, True]]


def test_keep_mask_bounds():
    keep = sample_keep_mask(jax.random.key(0), 64, 100)
    kept = np.asarray(keep.sum(-1))
    assert kept.min() >= 32 and kept.max() <= 50  # ratio >= 0.5 dropped, 32 always kept
    assert bool(sample_keep_mask(jax.random.key(1), 4, 16).all())  # <= 32 tokens: nothing dropped


def test_diffusion_sampler_shapes_and_seed():
    net = _randomize(diff.SimpleMLPAdaLN(8, 16, 32, 2, rngs=nnx.Rngs(0)), 3, 0.1)
    sched = diff.Schedule.make(1000, 8)
    assert sched.timestep_map.tolist() == [0, 143, 285, 428, 571, 714, 856, 999]
    z = jax.random.normal(jax.random.key(1), (5, 16))
    g, st = nnx.split(net)
    run = jax.jit(lambda st, z, k: diff.sample(nnx.merge(g, st), sched, z, k, z_uncond=z * 0, cfg=1.5))
    a, b, c = (run(st, z, jax.random.key(k)) for k in (7, 7, 8))
    assert a.shape == (5, 8)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3
    loss = diff.loss(net, diff.Schedule.make(1000), jax.random.normal(jax.random.key(2), (5, 8)), z, jax.random.key(3))
    assert np.isfinite(float(loss))
    assert diff.param_count(1024, 6, 32, 1536) == sum(x.size for x in jax.tree.leaves(nnx.state(
        nnx.eval_shape(lambda: diff.SimpleMLPAdaLN(32, 1536, 1024, 6, rngs=nnx.Rngs(0))))))


def test_kv_cache_layouts_equal_recomputation(model, tok):
    """The preallocated cache (dynamic_update_slice), the concatenated one (with chunked queries) and recomputing
    the prefix with block-causal positions give the same sample; an unknown layout is refused."""
    ctx = jax.random.normal(jax.random.key(0), (2, 3, 12))
    pos = jnp.tile(jnp.arange(3)[None], (2, 1))
    opts = SampleOptions(cfg=2.0, more_smooth=True)
    gd, st = nnx.split((model, tok.quantize))
    a = generate_fhat_jit(gd, st, ctx, pos, jax.random.key(3), opts, cache="prealloc")
    assert a.shape == (2, 4, 4, 8)
    # "concat" also attends queries at most 4 at a time (lax.map: 16 tokens in 4 chunks, 9 in 3 chunks of 3)
    for layout, chunk in (("concat", 4), ("none", None)):
        np.testing.assert_allclose(a, generate_fhat_jit(gd, st, ctx, pos, jax.random.key(3), opts, cache=layout,
                                                        q_chunk=chunk), atol=1e-4, err_msg=layout)
    c = generate_fhat_jit(gd, st, ctx, pos, jax.random.key(4), opts, cache="prealloc")
    assert float(jnp.abs(a - c).max()) > 1e-3  # the seed matters
    with pytest.raises(ValueError, match="cache layout"):
        generate_fhat(model, tok.quantize, ctx, pos, jax.random.key(3), opts, cache="paged")


def test_tokenizer_bfloat16_decode_close_to_float32(tok):
    """The bfloat16 tokenizer (bf16 convs, weights and activations; float32 GroupNorm statistics and attention
    softmax; float32 quantizer) decodes the same latent within 38 dB PSNR of float32 (measured 44-48 dB here and at
    the 1024px shape, see jaxeff/hart/README.md), returns float32 images in [-1, 1], and really computes in bf16
    (not bit-equal to float32)."""
    t16 = with_dtype(tok, jnp.bfloat16)
    assert t16.decoder.conv_in.kernel[...].dtype == t16.decoder.mid[1].qkv.kernel[...].dtype == jnp.bfloat16
    assert t16.decoder.norm_out.scale[...].dtype == t16.quantize.codebook.dtype == jnp.float32
    f = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    r32, r16 = (jax.jit(lambda s: nnx.merge(*s).decode(f, 1))(nnx.split(t)) for t in (tok, t16))
    assert r16.dtype == jnp.float32 and float(jnp.abs(r16).max()) <= 1.0
    assert 38.0 < psnr(r16, r32) < 80.0
    assert jax.eval_shape(t16.encode, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)).dtype == jnp.float32


def test_bfloat16_close_to_float32(model, tok):
    """bfloat16 weights and matmuls (float32 norms, softmax statistics, residual stream, sampler): the training
    forward's logits and hidden states, a guided 4-step diffusion sample and a whole generation stay finite and
    close to float32."""
    m16 = with_dtype(model, jnp.bfloat16)
    assert m16.blocks[0].attn.qkv_proj.kernel[...].dtype == jnp.bfloat16
    assert m16.blocks[0].ln_wo_grad.weight[...].dtype == jnp.float32
    ctx = jax.random.normal(jax.random.key(0), (2, 3, 12))
    pos = jnp.array([[0, 1, 2], [0, 1, 1]])
    img = jax.random.uniform(jax.random.key(9), (2, 16, 16, 3), minval=-1, maxval=1)
    idx, _, _ = tok.quantize.encode_hybrid(tok.encode(img))
    teacher = tok.quantize.teacher_forcing_input(idx)
    (lg32, h32), (lg16, h16) = (jax.jit(lambda s: nnx.merge(*s).forward_train(ctx, pos, teacher))(nnx.split(m))
                                for m in (model, m16))
    assert lg16.dtype == h16.dtype == jnp.float32
    for a, b in ((lg16, lg32), (h16, h32)):
        assert np.isfinite(np.asarray(a)).all()
        assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(b).max())
    z = model.diffusion_condition(h32[:, -16:], tok.quantize.codebook[idx[-1]]).reshape(32, -1)
    sched = diff.Schedule.make(1000, 4)
    t = jnp.full((16,), 500)
    x = jax.random.normal(jax.random.key(2), (16, 8))
    e32, e16 = (m.diffloss(x, t, z[:16]) for m in (model, m16))
    assert e16.dtype == jnp.float32 and float(jnp.abs(e16 - e32).max()) < 0.03 * float(jnp.abs(e32).max())
    # the sampler's x0 = c1 x - c2 eps amplifies eps rounding (c2 ~ 10 at the first step): compare on average
    s32, s16 = (diff.sample(m.diffloss, sched, z[:16], jax.random.key(1), z_uncond=z[16:], cfg=2.0, temperature=0.0)
                for m in (model, m16))
    assert np.isfinite(np.asarray(s16)).all() and float(jnp.abs(s16 - s32).mean()) < 0.02
    f16 = generate_fhat_jit(*nnx.split((m16, tok.quantize)), ctx, pos, jax.random.key(3), SampleOptions(cfg=2.0))
    assert f16.shape == (2, 4, 4, 8) and np.isfinite(np.asarray(f16)).all()


def test_block_causal_mask_and_mar_subsampling(model, tok):
    """Keeping every last-scale token equals no mask; dropping some changes only the last scale's outputs."""
    ctx = jax.random.normal(jax.random.key(0), (1, 3, 12))
    pos = jnp.arange(3)[None]
    keep = jnp.ones((1, 16), bool)
    img = jax.random.uniform(jax.random.key(9), (1, 16, 16, 3), minval=-1, maxval=1)
    idx, _, _ = tok.quantize.encode_hybrid(tok.encode(img))
    teacher = tok.quantize.teacher_forcing_input(idx)
    lg_full, h_last = model.forward_train(ctx, pos, teacher, keep)
    lg_nokeep, _ = model.forward_train(ctx, pos, teacher, None)
    np.testing.assert_allclose(lg_full, lg_nokeep, atol=1e-5)
    # dropping last-scale keys changes the last-scale outputs but not earlier scales (block-causal)
    drop = keep.at[0, :8].set(False)
    lg_drop, _ = model.forward_train(ctx, pos, teacher, drop)
    np.testing.assert_allclose(lg_drop[:, :-16], lg_full[:, :-16], atol=1e-5)
    assert float(jnp.abs(lg_drop[:, -16:] - lg_full[:, -16:]).max()) > 1e-4
    assert lg_full.shape == (1, TR.num_image_tokens, 64) and h_last.shape == (1, 16, 32)


def test_teacher_forcing_reproduces_generation_logits(model, tok):
    """The training forward, fed the tokens that generation sampled, gives the logits generation used at every
    scale: positions, level embeddings, masks and the f_hat recursion agree between the two paths."""
    ctx = jax.random.normal(jax.random.key(0), (2, 3, 12))
    pos = jnp.array([[0, 1, 2], [0, 1, 1]])  # second prompt padded: positions repeat, image offset is 1
    opts = SampleOptions(cfg=0.0, more_smooth=False, use_diffusion=False)  # guidance 0: logits are the cond half
    gen = jax.jit(lambda st: generate_fhat(nnx.merge(*st), tok.quantize, ctx, pos, jax.random.key(2), opts,
                                           return_tokens=True))
    f_hat, idx, logits = gen(nnx.split(model))
    np.testing.assert_allclose(tok.quantize.idx_to_fhat(idx), f_hat, atol=1e-5)
    lg_train, _ = model.forward_train(ctx, pos, tok.quantize.teacher_forcing_input(idx))
    np.testing.assert_allclose(lg_train, jnp.concatenate(logits, 1), atol=2e-4, rtol=2e-4)


def test_maskgit_schedule():
    """Tokens per MAR iteration: the cosine rule of the reference, at least one token left for the last step."""
    assert maskgit_schedule(16, 1) == [16]
    assert maskgit_schedule(16, 4) == [2, 3, 5, 6]  # floor(16 cos(k pi/8)) = 14, 11, 6 stay masked
    assert maskgit_schedule(4, 8) == [1, 1, 1, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="num_maskgit_iters"):
        SampleOptions(num_maskgit_iters=0)


def test_multi_iteration_mar(model, tok):
    """4 MAR iterations with a given order: the first iteration's guided logits equal the training forward that
    keeps only its tokens (cond and uncond halves run separately); later iterations see the earlier ones through
    the KV cache, which equals recomputing with a mask that is block-causal over iterations, and differs from one
    iteration (whole last scale at once). Greedy tokens follow the guided logits."""
    ctx = jax.random.normal(jax.random.key(0), (2, 3, 12))
    pos = jnp.array([[0, 1, 2], [0, 1, 1]])
    order = np.stack([np.random.default_rng(s).permutation(16) for s in (0, 1)])
    opts = SampleOptions(cfg=2.0, top_k=1, top_k_late=1, more_smooth=False, use_diffusion=False, num_maskgit_iters=4)
    gen = jax.jit(lambda st, cache: generate_fhat(nnx.merge(*st), tok.quantize, ctx, pos, jax.random.key(2), opts,
                                                  cache=cache, return_tokens=True, mar_order=order),
                  static_argnums=1)
    f_hat, idx, logits = gen(nnx.split(model), "prealloc")
    f_hat_nc, idx_nc, logits_nc = gen(nnx.split(model), "none")
    np.testing.assert_allclose(logits[-1], logits_nc[-1], atol=1e-3)
    np.testing.assert_array_equal(jnp.concatenate(idx, 1), jnp.concatenate(idx_nc, 1))
    np.testing.assert_array_equal(idx[-1], jnp.argmax(logits[-1], -1))
    np.testing.assert_allclose(tok.quantize.idx_to_fhat(idx), f_hat, atol=1e-5)

    teacher = tok.quantize.teacher_forcing_input(idx)
    t = float(cfg_ramp(2.0, 4)[-1])

    def guided(keep):
        lc, _ = model.forward_train(ctx, pos, teacher, jnp.asarray(keep))
        lu, _ = model.forward_train(jnp.zeros_like(ctx), jnp.zeros_like(pos), teacher, jnp.asarray(keep))
        return np.asarray((1 + t) * lc[:, -16:] - t * lu[:, -16:])

    rows, first = np.arange(2)[:, None], order[:, -maskgit_schedule(16, 4)[0]:]
    keep = np.zeros((2, 16), bool)
    keep[rows, first] = True
    whole = guided(np.ones((2, 16), bool))
    tol = 1e-4 * np.abs(whole).max()  # float32 rounding through two random layers and the CFG combination
    np.testing.assert_allclose(np.asarray(logits[-1])[rows, first], guided(keep)[rows, first], atol=tol)
    assert np.abs(np.asarray(logits[-1]) - whole).max() > 100 * tol


def test_condition_dropout_rules(model, tok):
    """The reference drops the text where randn(B) < rate: Phi(0.1) = 54% of samples (and half at rate 0);
    "uniform" drops `rate` of them. hart_loss applies the chosen rule and reports the share it dropped."""
    n = 40000
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    for rule, rate, want in (("official", 0.1, phi(0.1)), ("official", 0.0, 0.5), ("uniform", 0.1, 0.1)):
        share = float(jnp.mean(drop_condition(jax.random.key(0), n, rate, rule)))
        assert abs(share - want) < 0.01, (rule, rate, share)
    with pytest.raises(ValueError, match="'official' or 'uniform'"):
        drop_condition(jax.random.key(0), 4, 0.1, "rand")

    b = 32
    img = jax.random.uniform(jax.random.key(9), (1, 16, 16, 3), minval=-1, maxval=1)
    idx, resid, _ = tok.quantize.encode_hybrid(tok.encode(img))
    batch = {"idx": jnp.tile(jnp.concatenate(idx, 1), (b, 1)),
             "teacher": jnp.tile(tok.quantize.teacher_forcing_input(idx), (b, 1, 1)),
             "resid": jnp.tile(resid.reshape(1, 16, 8), (b, 1, 1)), "labels": jnp.arange(b) % 3,
             "codebook": tok.quantize.codebook, "key": jax.random.key(5)}
    cc = ClassConditionedHART(model, 3, rngs=nnx.Rngs(0))
    shares = {rule: float(hart_loss(cc, batch, cond_drop=rule)[1]["cond_drop"]) for rule in ("official", "uniform")}
    assert shares["official"] > 0.3 and shares["uniform"] < 0.25, shares


def test_memory_chunking_keeps_results(model, tok):
    """The memory options change memory, not results: the diffusion head 2 tokens at a time and the decoder one
    image at a time equal the unchunked calls; chunk sizes are even; "auto" query chunks follow the score budget;
    a bad q_chunk is refused; largest_batch finds the largest fitting batch in a few calls, also where the
    peak jumps."""
    assert (even_chunk(2304, 1024), even_chunk(4096, 1024), even_chunk(9, 4), even_chunk(3, 8)) == (768, 1024, 3, 3)
    with pytest.raises(ValueError, match="chunk size"):
        even_chunk(5, 0)
    # the last 1024px scale (24 heads, 9750 keys): 256 queries per call at batch 1 with CFG, 32 at batch 8
    assert (query_chunk("auto", 2, 24, 9750), query_chunk("auto", 16, 24, 9750)) == (256, 32)
    assert query_chunk("auto", 4096, 24, 9750) == MIN_Q_CHUNK and query_chunk(None, 2, 24, 9750) is None
    ctx, pos = jnp.zeros((1, 3, 12)), jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="q_chunk"):
        generate_fhat(model, tok.quantize, ctx, pos, jax.random.key(0), SampleOptions(), q_chunk="big")
    net = model.diffloss
    z = jax.random.normal(jax.random.key(1), (5, TR.embed_dim))
    sched = diff.Schedule.make(1000, 4)
    whole, chunked = (diff.sample(net, sched, z, jax.random.key(2), z_uncond=-z, cfg=1.5, token_chunk=c)
                      for c in (None, 2))
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    f = jax.random.normal(jax.random.key(3), (3, 4, 4, TOK.z_channels))
    np.testing.assert_allclose(tok.decode(f, 1), tok.decode(f), atol=1e-5)
    calls = []
    assert largest_batch(lambda b: calls.append(b) or 10 + 3 * b, 25) == 5 and calls == [1, 2, 5, 6]
    assert largest_batch(lambda b: 10 + 3 * b, 12) == 0 and largest_batch(lambda b: 10 + 3 * b, 10**6, limit=7) == 7
    assert largest_batch(lambda b: 10 + 3 * b + 100 * (b > 3), 40) == 3
