"""Golden parity with the official HART code (mit-han-lab/hart@e28a41f, CPU float32): ../shared/data/hart_golden
holds a tiny HART in the released layout (two transformer variants, one tokenizer) and the official outputs; its
README lists every array and the tolerances used here. Skipped where ../shared is absent (a user's clone)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.hart import diffusion as diff
from jaxeff.hart.loading import load_hart
from jaxeff.hart.transformer import SampleOptions, generate_fhat
from jaxeff.nn.resample import resize

# The README's tolerances (maximum absolute error); integer outputs must be equal.
PARTS = 1e-5  # tokenizer and quantizer, diffusion network, single diffusion steps
TRANSFORMER = 1e-4  # logits and hidden states
SAMPLER = 1e-4  # the 8-step diffusion sampler
VARIANTS = {"A": "llm", "B": "llm_l2norm"}


@pytest.fixture(scope="module")
def golden(shared_data):
    return shared_data("hart_golden")


@pytest.fixture(scope="module")
def models(golden):
    """Variant -> (transformer, tokenizer), each loaded from its llm folder with the tokenizer found beside it."""
    return {v: load_hart(golden / "hart-tiny" / sub) for v, sub in VARIANTS.items()}


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def close(got, want, atol, name):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


def test_checkpoint_layout(golden, models):
    (tr_a, tok), (tr_b, _) = models["A"], models["B"]
    assert (tr_a.cfg.embed_dim, tr_a.cfg.depth, tr_a.cfg.num_heads, tr_a.cfg.patch_nums) == (64, 2, 4, (1, 2, 3, 5))
    assert not tr_a.cfg.attn_l2_norm and tr_b.cfg.attn_l2_norm and tr_b.cfg.use_context_norm
    assert (tok.cfg.vocab_size, tok.cfg.z_channels, tok.cfg.ch_mult, tok.cfg.image_size) == (64, 8, (1, 1), 10)
    # one head's stored log-scale is log(150), above the clamp at log(100)
    assert float(jnp.max(tr_b.blocks[0].attn.scale_mul_1H11[...])) > np.log(100)
    root, _ = load_hart(golden / "hart-tiny")  # the model root resolves to llm/
    np.testing.assert_array_equal(root.head.kernel[...], tr_a.head.kernel[...])


def test_tokenizer(golden, models):
    d = np.load(golden / "tokenizer.npz")
    tok = models["A"][1]
    q = tok.quantize
    pns = tuple(int(p) for p in d["patch_nums"])
    assert pns == tok.cfg.patch_nums
    f = nhwc(d["f"])
    idx, resid, fhat = q.encode_hybrid(f)
    np.testing.assert_array_equal(np.concatenate(idx, 1), d["idx"])
    close(resid.reshape(2, -1, 8), d["frest_wo_last"], PARTS, "frest_wo_last")
    close(fhat.transpose(0, 3, 1, 2), d["fhat_discrete"], PARTS, "fhat_discrete")
    close(q.teacher_forcing_input(idx), d["teacher_input"], PARTS, "teacher_input")

    running = 0.0  # VAR's f_hat after each scale: Phi on every scale, the last included
    for si, (pn, want) in enumerate(zip(pns, d["fhat_var_per_scale"], strict=True)):
        running = running + q.phi(si, resize(q.lookup(idx[si], pn), pns[-1], "bicubic"))
        close(running.transpose(0, 3, 1, 2), want, PARTS, f"fhat_var_per_scale[{si}]")
    close(q.idx_to_fhat(idx, last_phi=True).transpose(0, 3, 1, 2), d["fhat_var_per_scale"][-1], PARTS, "idx_to_fhat")
    np.testing.assert_array_equal(d["idx_var"], d["idx"])

    # the generation update, fed the code vectors of idx scale by scale
    f_hat, nxt = jnp.zeros_like(f), []
    for si, pn in enumerate(pns):
        f_hat, x = q.next_autoregressive_input(si, f_hat, q.lookup(idx[si], pn))
        if si < len(pns) - 1:
            nxt.append(x.reshape(2, -1, 8))
    close(jnp.concatenate(nxt, 1), d["next_inputs"], PARTS, "next_inputs")
    close(f_hat.transpose(0, 3, 1, 2), d["fhat_discrete"], PARTS, "fhat_discrete (generation)")

    # the VQ-VAE training forward, continuous part skipped or kept
    for skip, suffix in ((True, ""), (False, "_full")):
        out, vq_loss, tidx = q.quantize_train(f, skip)
        close(out.transpose(0, 3, 1, 2), d["train_fhat_skip" if skip else "train_fhat_full"], PARTS, "train_fhat")
        close(vq_loss, d["train_vq_loss" + suffix], PARTS, "train_vq_loss" + suffix)
        np.testing.assert_array_equal(np.concatenate(tidx, 1), d["train_idx"])

    for latent, name in ((d["fhat_discrete"], "discrete"), (d["f"], "hybrid")):
        raw = tok.decoder(tok.post_quant_conv(nhwc(latent)))
        close(raw.transpose(0, 3, 1, 2), d[f"dec_{name}_raw"], PARTS, f"dec_{name}_raw")
        close(tok.decode(nhwc(latent)).transpose(0, 3, 1, 2), d[f"dec_{name}_img"], PARTS, f"dec_{name}_img")
    close(tok.encode(nhwc(d["img"])).transpose(0, 3, 1, 2), d["enc_latent"], PARTS, "enc_latent")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformer_training_forward(golden, models, variant):
    d = np.load(golden / f"transformer_train_{variant}.npz")
    tr, tok = models[variant]
    ctx, pos, teacher = (jnp.asarray(d[k]) for k in ("context", "context_position_ids", "teacher_input"))
    close(tr.embed_context(ctx)[0], d["context_embed"], TRANSFORMER, "context_embed")
    x, cond, cos, sin, positions = tr.training_inputs(ctx, pos, teacher)
    for i, blk in enumerate(tr.blocks):
        x, _ = blk(x, cond, cos, sin, positions)
        close(x, d[f"block{i}_out"], TRANSFORMER, f"block{i}_out")
    logits, h_last = tr.forward_train(ctx, pos, teacher)
    close(logits, d["logits"], TRANSFORMER, "logits")
    close(h_last, d["h_last"], TRANSFORMER, "h_last")
    codes = tok.quantize.codebook[d["gt_idx"][:, -h_last.shape[1]:]]
    close(tr.diffusion_condition(h_last, codes), d["diff_condition"], TRANSFORMER, "diff_condition")
    if variant == "A":  # MAR-subsampled last scale: the official forward returns the kept tokens only
        keep = d["mar_keep"]
        logits_mar, _ = tr.forward_train(ctx, pos, teacher, jnp.asarray(keep))
        n_before = logits.shape[1] - keep.shape[1]
        rows = np.concatenate([np.ones((2, n_before), bool), keep], 1)
        close(np.stack([np.asarray(logits_mar[i])[rows[i]] for i in range(2)]), d["logits_mar"], TRANSFORMER,
              "logits_mar")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_kv_cached_inference_with_cfg(golden, models, variant):
    """The official run: cfg 4.5, more_smooth off, one MaskGIT iteration, final_stage 1 (no diffusion), argmax of the
    guided logits (top-k 1 here)."""
    d = np.load(golden / f"inference_greedy_{variant}.npz")
    tr, tok = models[variant]
    opts = SampleOptions(cfg=float(d["cfg"]), top_k=1, top_k_late=1, more_smooth=False, use_diffusion=False)
    fhat, tokens, logits = generate_fhat(tr, tok.quantize, jnp.asarray(d["context"]),
                                         jnp.asarray(d["context_position_ids"]), jax.random.key(0), opts,
                                         return_tokens=True)
    close(jnp.concatenate(logits, 1), d["guided_logits"], TRANSFORMER, "guided_logits")
    np.testing.assert_array_equal(jnp.concatenate(tokens, 1), d["tokens"])
    close(fhat.transpose(0, 3, 1, 2), d["fhat"], PARTS, "fhat")
    close(((tok.decode(fhat) + 1) / 2).transpose(0, 3, 1, 2), d["image01"], PARTS, "image01")


def test_diffusion_head(golden, models):
    d = {k: jnp.asarray(v) for k, v in np.load(golden / "diffusion.npz").items()}
    net = models["A"][0].diffloss
    close(net(d["x"], d["t"], d["c"]), d["net_out"], PARTS, "net_out")

    # forward_with_cfg: the model input is the first half of x twice; rows 0..5 are what the pipeline uses
    half = d["cfg_x"].shape[0] // 2
    cfg = float(d["cfg_scale"])
    guided = diff.guided_output(net, d["cfg_x"][:half], d["cfg_t"][:half], d["cfg_c"][:half], d["cfg_c"][half:], cfg)
    close(guided, d["cfg_out"][:half], PARTS, "cfg_out")
    close(guided[:, :8], d["cfg_out"][half:, :8], PARTS, "cfg_out eps (second half)")

    sched = diff.Schedule.make(1000, 8)
    np.testing.assert_array_equal(sched.timestep_map, d["timestep_map"])
    np.testing.assert_allclose(sched.betas, np.asarray(np.load(golden / "diffusion.npz")["respaced_betas"]),
                               rtol=1e-12)
    # one reverse step with the CFG model and x0 clipping; rows from `half` on carry the uncond half's variance
    ti = d["step_t_index"]
    t_net = jnp.asarray(sched.timestep_map)[ti]
    unc_var = net(d["cfg_x"][:half], t_net[half:], d["cfg_c"][half:])[:, 8:]
    guided = diff.guided_output(net, d["cfg_x"][:half], t_net[:half], d["cfg_c"][:half], d["cfg_c"][half:], cfg)
    out = jnp.concatenate([guided, jnp.concatenate([guided[:, :8], unc_var], 1)], 0)
    mean, log_var, x0 = sched.p_mean_logvar(out, d["cfg_x"], ti)
    # rows from `half` on are not used by the pipeline; there x0 = x / sqrt(alpha_bar) - c * eps at t = 856 scales
    # float32 rounding of eps by ~10, so they get the sampler's tolerance
    for rows, atol in ((slice(None, half), PARTS), (slice(half, None), SAMPLER)):
        close(mean[rows], d["step_mean"][rows], atol, "step_mean")
        close(log_var[rows], d["step_log_variance"][rows], atol, "step_log_variance")
        close(x0[rows], d["step_pred_xstart"][rows], atol, "step_pred_xstart")

    # the whole 8-step sampler at temperature 0 from the given initial noise (same noise for both halves)
    z, n = d["sample_z"], d["sample_noise"].shape[0]
    out = diff.sample(net, sched, z[:n], jax.random.key(0), z_uncond=z[n:], cfg=float(d["sample_cfg"]),
                      temperature=0.0, scale=float(d["vae_scale"]), noise=d["sample_noise"])
    close(out, d["sample_out"][:n], SAMPLER, "sample_out")
    close(out, d["sample_out"][n:], SAMPLER, "sample_out (second half)")

    # the training loss terms on the 1000-step process
    train = diff.Schedule.make(1000)
    mse, vb = diff.loss_terms(net, train, d["loss_target"] / float(d["vae_scale"]), d["loss_z"], d["loss_t"],
                              d["loss_noise"])
    close(mse, d["loss_mse"], PARTS, "loss_mse")
    close(vb, d["loss_vb"], PARTS, "loss_vb")
    close(mse + vb, d["loss_per_token"], PARTS, "loss_per_token")
    close(jnp.mean(mse + vb), d["loss_mean"], PARTS, "loss_mean")
