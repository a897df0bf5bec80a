"""ForeAct's generator vs the official code's outputs on a tiny random model (../shared/data/foreact_golden, see its
README), and the Flow-DPM-Solver++ vs diffusers' `DPMSolverMultistepScheduler` directly.

Tolerances are the README's ("What counts as a match", float32 on CPU). Latents are NCHW there, NHWC here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.foreact import scheduler, training
from jaxeff.foreact.config import SanaConfig, preset
from jaxeff.foreact.sampling import combine_guidance, sample
from jaxeff.foreact.weights import config_for, generator_from_tensors, read_tensors, split_released
from jaxeff.io.state_dict import CheckpointMismatchError

forward = nnx.jit(lambda m, *a, **k: m(*a, **k), static_argnames=("view_ids", "return_internals"))


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
    return np.asarray(a).transpose(*range(np.ndim(a) - 3), -1, -3, -2)


@pytest.fixture(scope="module")
def golden(shared_data):
    return shared_data("foreact_golden")


@pytest.fixture(scope="module")
def models(golden):
    """(single-view, two-view) generators: the checkpoint with and without its view embedding."""
    directory, tensors = read_tensors(golden / "foreact-tiny")
    multi = generator_from_tensors(tensors, config_for(directory, tensors, None))
    single_tensors = {k: v for k, v in tensors.items() if not k.startswith("view_embedding")}
    single = generator_from_tensors(single_tensors, config_for(directory, single_tensors, None))
    return single, multi


def test_transformer_single_view(golden, models):
    z = np.load(golden / "transformer_single_view.npz")
    (out,), internals = forward(models[0], [nhwc(z["x_t"])], [nhwc(z["source_latent"])], jnp.asarray(z["timestep"]),
                                  jnp.asarray(z["caption_embeds"]), jnp.asarray(z["caption_mask"]),
                                  return_internals=True)
    np.testing.assert_allclose(nchw(out), z["output"], rtol=0, atol=2e-4)
    for name in ("time_mod", "embedded_timestep", "caption_tokens", "block0_out", "block1_out"):
        np.testing.assert_allclose(internals[name], z[f"internals/{name}"], rtol=0, atol=2e-4, err_msg=name)
    np.testing.assert_allclose(internals["target_tokens_in"][0], z["internals/target_tokens_in"], atol=2e-4)
    np.testing.assert_allclose(internals["source_tokens_in"][0], z["internals/source_tokens_in"], atol=2e-4)
    # a padded caption position must get exactly zero weight (as in the official float32 run)
    cap = np.asarray(z["caption_embeds"]).copy()
    cap[1, :5] = 100.0
    (moved,) = forward(models[0], [nhwc(z["x_t"])], [nhwc(z["source_latent"])], jnp.asarray(z["timestep"]),
                         jnp.asarray(cap), jnp.asarray(z["caption_mask"]))
    np.testing.assert_array_equal(np.asarray(moved)[1], np.asarray(out)[1])


def test_transformer_multi_view(golden, models):
    z = np.load(golden / "transformer_multi_view.npz")
    outs, internals = forward(models[1], [nhwc(z["x_t_view0"]), nhwc(z["x_t_view1"])],
                                [nhwc(z["source_view0"]), nhwc(z["source_view1"])], jnp.asarray(z["timestep"]),
                                jnp.asarray(z["caption_embeds"]), jnp.asarray(z["caption_mask"]),
                                view_ids=tuple(z["view_ids"].tolist()), return_internals=True)
    for v in range(2):
        np.testing.assert_allclose(nchw(outs[v]), z[f"output_view{v}"], rtol=0, atol=2e-4)
    for b in range(2):
        np.testing.assert_allclose(internals[f"block{b}_out"], z[f"internals/block{b}_out"], rtol=0, atol=2e-4)


def test_transformer_bad_input(models):
    single, multi = models
    x = jnp.zeros((1, 4, 4, 32))
    cap, mask = jnp.zeros((1, 3, 32)), jnp.ones((1, 3))
    with pytest.raises(ValueError, match="target"):
        single([x], [jnp.zeros((1, 4, 5, 32))], jnp.zeros(1), cap, mask)
    with pytest.raises(ValueError, match="single-view"):
        single([x, x], [x, x], jnp.zeros(1), cap, mask)
    with pytest.raises(ValueError, match="view_ids"):
        multi([x], [x], jnp.zeros(1), cap, mask, view_ids=[2])
    with pytest.raises(ValueError, match="caption"):
        single([x], [x], jnp.zeros(1), jnp.zeros((1, 3, 31)), mask)


def test_loader_names_bad_keys(golden):
    directory, tensors = read_tensors(golden / "foreact-tiny")
    cfg = config_for(directory, tensors, None)
    bad = dict(tensors, **{"transformer.extra.weight": np.zeros(3, np.float32)})
    bad["transformer.proj_out.bias"] = np.zeros(5, np.float32)
    del bad["transformer.caption_norm.weight"]
    with pytest.raises(CheckpointMismatchError) as e:
        generator_from_tensors(bad, cfg)
    for name in ("transformer.extra.weight", "transformer.proj_out.bias", "transformer.caption_norm.weight"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="text_encoder.x"):
        split_released({"text_encoder.x": np.zeros(1)})
    parts = split_released({"vae.encoder.w": np.zeros(1), "mllm_backbone.model.norm.weight": np.zeros(1)})
    assert list(parts["vae"]) == ["encoder.w"] and list(parts["mllm_backbone"]) == ["model.norm.weight"]
    with pytest.raises(ValueError, match="num_views"):
        config_for(directory, tensors, cfg.__class__(**{**cfg.__dict__, "num_views": 1}))


def test_config_presets():
    cfg = preset("1600M-512")
    assert (cfg.inner_dim, cfg.ffn_hidden, cfg.num_layers) == (2240, 5600, 20)
    with pytest.raises(ValueError, match="qk_norm"):
        SanaConfig.from_diffusers({"qk_norm": "rms_norm"})
    with pytest.raises(ValueError, match="unknown SANA preset"):
        preset("600M")


def test_scheduler_golden(golden):
    z = np.load(golden / "scheduler.npz")
    for n in (8, 20):
        sigmas, timesteps = scheduler.flow_sigmas(n)
        np.testing.assert_array_equal(sigmas, z[f"steps{n}/sigmas"])
        np.testing.assert_array_equal(timesteps, z[f"steps{n}/timesteps"])
    ts, sig = scheduler.train_schedule()
    np.testing.assert_array_equal(ts, z["train/flowmatch_timesteps"])
    np.testing.assert_array_equal(sig, z["train/flowmatch_sigmas"])
    sigmas = jnp.asarray(scheduler.flow_sigmas(8)[0])
    step = jax.jit(scheduler.dpm_solver_step)
    x, x0 = jnp.asarray(z["traj/x_init"]), jnp.zeros_like(jnp.asarray(z["traj/x_init"]))
    for i in range(8):
        np.testing.assert_allclose(x, z["traj/sample_before"][i], rtol=0, atol=1e-5, err_msg=f"step {i}")
        x, x0 = step(x, jnp.asarray(z["traj/model_output"][i]), x0, i, sigmas)
    np.testing.assert_allclose(x, z["traj/x_final"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [8, 20])
def test_scheduler_vs_diffusers(steps):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    # SANA's scheduler_config.json values (the golden README lists them)
    ref = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", use_flow_sigmas=True, flow_shift=3.0,
        prediction_type="flow_prediction", final_sigmas_type="zero", lower_order_final=True)
    ref.set_timesteps(steps)
    step = jax.jit(scheduler.dpm_solver_step)
    sigmas, timesteps = scheduler.flow_sigmas(steps)
    np.testing.assert_array_equal(ref.sigmas.numpy(), sigmas)
    np.testing.assert_array_equal(ref.timesteps.numpy(), timesteps)
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
    xt, x0, ours = torch.from_numpy(x), jnp.zeros_like(x), jnp.asarray(x)
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(x.shape).astype(np.float32)
        xt = ref.step(torch.from_numpy(v), t, xt).prev_sample
        ours, x0 = step(ours, jnp.asarray(v), x0, i, jnp.asarray(sigmas))
        np.testing.assert_allclose(ours, xt.numpy(), rtol=0, atol=1e-5, err_msg=f"step {i}")


@pytest.mark.parametrize("name", ["single", "multi"])
def test_sampling_golden(golden, models, name):
    z = np.load(golden / f"sampling_{name}_view.npz")
    views = range(1 if name == "single" else 2)
    emb, mask = jnp.asarray(z["prompt_embeds"]), jnp.asarray(z["prompt_mask"])
    np.testing.assert_array_equal(scheduler.flow_sigmas(8)[1], z["timesteps"])
    final, (traj) = sample(
        models[0] if name == "single" else models[1], [nhwc(z[f"view{v}/initial_noise"]) for v in views],
        [nhwc(z[f"view{v}/source_latent"]) for v in views], emb[2:], mask[2:], emb[:1], mask[:1],
        null_sources=[nhwc(z[f"view{v}/null_source_latent"]) for v in views],
        guidance_scale=float(z["guidance_scale"]), image_guidance_scale=float(z["image_guidance_scale"]),
        return_trajectory=True)
    for v in views:
        before, outs, guided = traj[v]
        np.testing.assert_allclose(nchw(before), z[f"view{v}/latent_before"], rtol=0, atol=5e-4)
        np.testing.assert_allclose(nchw(outs[:, :, 0]), z[f"view{v}/transformer_out"], rtol=0, atol=5e-4)
        np.testing.assert_allclose(nchw(guided), z[f"view{v}/cfg_combined"], rtol=0, atol=5e-4)
        np.testing.assert_allclose(nchw(final[v]), z[f"view{v}/final_latent"], rtol=0, atol=5e-4)
        # the CFG combination alone, on the stored branch outputs
        comb = combine_guidance(jnp.asarray(z[f"view{v}/transformer_out"]).swapaxes(0, 1)[:, :, None],
                                float(z["guidance_scale"]), float(z["image_guidance_scale"]))
        np.testing.assert_allclose(comb, z[f"view{v}/cfg_combined"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["single", "multi"])
def test_training_loss_golden(golden, models, name):
    z = np.load(golden / f"training_loss_{name}_view.npz")
    views = range(1 if name == "single" else 2)
    loss, aux = nnx.jit(training.flow_matching_loss, static_argnames=("return_aux",))(
        models[0] if name == "single" else models[1], [nhwc(z[f"view{v}/target_latent"]) for v in views],
        [nhwc(z[f"view{v}/source_latent"]) for v in views], jnp.asarray(z["prompt_embeds"]),
        jnp.asarray(z["prompt_mask"]), jnp.asarray(z["u"]), [nhwc(z[f"view{v}/noise"]) for v in views],
        return_aux=True)
    np.testing.assert_array_equal(aux["t"], z["timesteps"])
    np.testing.assert_array_equal(aux["sigma"], z["sigmas"])
    for v in views:
        np.testing.assert_allclose(nchw(aux["noisy"][v]), z[f"view{v}/noisy_latent"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(nchw(aux["prediction"][v]), z[f"view{v}/prediction"], rtol=0, atol=2e-4)
    np.testing.assert_allclose(float(loss), float(z["loss"]), rtol=1e-5)


def test_cfg_dropout():
    drop_t, drop_i = training.cfg_dropout_masks(jax.random.key(0), 20000)
    drop_t, drop_i = np.asarray(drop_t), np.asarray(drop_i)
    # 10 % text only, 10 % both, 10 % image only (tolerance ~6 sigma at n = 20000)
    for frac, want in (((drop_t & ~drop_i).mean(), 0.1), ((drop_t & drop_i).mean(), 0.1),
                       ((~drop_t & drop_i).mean(), 0.1), ((~drop_t & ~drop_i).mean(), 0.7)):
        assert abs(frac - want) < 0.015
    cap, mask = jnp.ones((8, 3, 2)), jnp.ones((8, 3), jnp.int32)
    src = [jnp.ones((8, 2, 2, 1)), 2 * jnp.ones((8, 1, 1, 1))]
    key = jax.random.key(3)
    c, m, s = training.apply_cfg_dropout(key, cap, mask, jnp.zeros((1, 3, 2)), jnp.zeros((1, 3), jnp.int32),
                                         src, [jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 1, 1, 1))])
    dt, di = (np.asarray(a) for a in training.cfg_dropout_masks(key, 8))
    np.testing.assert_array_equal(np.asarray(c)[:, 0, 0] == 0, dt)
    np.testing.assert_array_equal(np.asarray(s[0])[:, 0, 0, 0] == 0, di)
    np.testing.assert_array_equal(np.asarray(s[1])[:, 0, 0, 0] == 0, di)


def test_plain_sana_vs_diffusers():
    """Without source latents the model is diffusers' text-to-image `SanaTransformer2DModel` (random tiny config,
    loaded through the released-layout loader from its state dict)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    kw = dict(in_channels=8, out_channels=8, num_layers=2, num_attention_heads=2, attention_head_dim=8,
              num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
              mlp_ratio=2.5)
    torch.manual_seed(0)
    ref = diffusers.SanaTransformer2DModel(**kw, sample_size=8, patch_size=1, interpolation_scale=None).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight non-trivial anyway
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tensors = {f"transformer.{k}": v.numpy() for k, v in ref.state_dict().items()}
    model = generator_from_tensors(tensors, SanaConfig(**kw))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 5, 6)).astype(np.float32)
    cap = rng.standard_normal((2, 7, 12)).astype(np.float32)
    mask = np.array([[1] * 7, [0] * 3 + [1] * 4])
    t = np.array([999, 321])
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(cap), torch.from_numpy(t),
                   encoder_attention_mask=torch.from_numpy(mask)).sample.numpy()
    (got,) = forward(model, [nhwc(x)], [], jnp.asarray(t), jnp.asarray(cap), jnp.asarray(mask))
    np.testing.assert_allclose(nchw(got), want, rtol=0, atol=2e-4)
