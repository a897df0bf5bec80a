"""DC-AE experiments: checkpoint handling of the pretrained runs, optax phase masks and BatchNorm modes of the
adaptation trainer, UViT cost."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.dcae import DCAE, DCAEConfig, torch_state
from jaxeff.dcae.training import init_model, make_recon, make_step
from jaxeff.experiment import ExperimentError, run_experiment
from jaxeff.io.safetensors import save_checkpoint_dir, save_file


def test_dcae_pretrained_needs_checkpoint(tmp_path):
    with pytest.raises(ExperimentError, match="no checkpoint given.*ckpt=.*huggingface.co/collections/mit-han-lab"):
        run_experiment("dcae_f32c32", "smoke", {}, runs_root=tmp_path)
    with pytest.raises(ExperimentError, match="does not exist"):
        run_experiment("dcae_f64c128", "smoke", {"ckpt": str(tmp_path / "missing")}, runs_root=tmp_path)
    assert not any(tmp_path.iterdir())  # validation fails before a run directory exists


def test_dcae_pretrained_runs_on_a_small_f32c32_checkpoint(tmp_path):
    # the f32c32 family's shape (6 stages, 32 latent channels) at toy widths, saved in the diffusers layout
    cfg = DCAEConfig(
        attention_head_dim=8,
        encoder_block_out_channels=(8, 16, 16, 32, 32, 32),
        decoder_block_out_channels=(8, 16, 16, 32, 32, 32),
        encoder_layers_per_block=(0, 1, 1, 1, 1, 1),
        decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
    )
    ckpt = tmp_path / "tiny-diffusers"
    save_checkpoint_dir(torch_state(DCAE.random(cfg, seed=0)), ckpt, stem="diffusion_pytorch_model")
    (ckpt / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    run = run_experiment("dcae_f32c32", "smoke", {"ckpt": str(ckpt), "resolution": "64", "images": "coffee"},
                         runs_root=tmp_path / "runs")
    text = (run.dir / "results.md").read_text()
    assert "| coffee |" in text and "latent (2, 2, 32)" in text
    assert (run.dir / "reconstructions.png").exists()
    with pytest.raises(ValueError, match="f32c32 model, but this experiment is for f64c128"):
        run_experiment("dcae_f64c128", "smoke", {"ckpt": str(ckpt), "resolution": "64", "images": "coffee"},
                       runs_root=tmp_path / "runs")


def test_dcae_adaptation_masks_freeze_other_layers():
    from experiments.dcae_adaptation import PHASE_LAYERS, Config, _dotted, autoencoder_config, masked, phase_labels

    acfg = autoencoder_config(Config(base_width=8))
    assert acfg.decoder_norm_types[:2] == ("batch_norm",) * 2  # the in/mix pattern by default
    graphdef, params, stats = init_model(acfg, seed=0)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    recon = make_recon(graphdef)
    for phase in (2, 3):
        labels = phase_labels(params, phase)
        tx = masked(optax.adam(1e-2), labels)
        before, stats_before = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, stats)
        y_before = np.asarray(recon(params, stats, x))
        step = make_step(graphdef, tx, train_norms=PHASE_LAYERS[phase])
        params, stats, _, _ = step(params, stats, tx.init(params), x)
        changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, params))
        flat = jax.tree_util.tree_flatten_with_path(labels)[0]
        trained = {_dotted(path) for path, lab in flat if lab == "train"}
        assert all(any(t.startswith(p) for t in trained) for p in PHASE_LAYERS[phase])
        assert all(t.startswith(PHASE_LAYERS[phase]) for t in trained)
        assert all(c == (lab == "train") for (_, lab), c in zip(flat, changed))
        # BatchNorm running statistics move only in the trained layers (phase 3: the decoder head's bn2d stage)
        moved = {_dotted(p) for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(stats_before)[0],
                                                  jax.tree.leaves(stats)) if np.any(a != np.asarray(b))}
        if phase == 2:
            assert not moved
        else:
            assert moved and all(m.startswith(PHASE_LAYERS[3]) for m in moved)
        assert not np.allclose(np.asarray(recon(params, stats, x)), y_before)


def test_dcae_adaptation_runs_on_a_bn2d_decoder(tmp_path):
    """All three phases with the default loss (L1 + 0.25 LPIPS-VGG16, random VGG weights here) on the in/mix-style
    decoder with bn2d stages."""
    from test_dcae_metrics import random_lpips_vgg_tensors

    save_file(random_lpips_vgg_tensors(np.random.default_rng(0)), tmp_path / "vgg.safetensors")
    overrides = {"base_width": "8", "low_res": "16", "high_res": "32", "steps1": "2", "steps2": "1", "steps3": "1",
                 "batch_low": "4", "batch_high": "2", "disc_width": "8", "test_low": "16,24", "test_high": "32,48",
                 "lpips_weights": str(tmp_path / "vgg.safetensors")}
    run = run_experiment("dcae_adaptation", "full", overrides, runs_root=tmp_path / "runs")
    text = (run.dir / "results.md").read_text()
    assert "loss L1 + 0.25 x LPIPS-VGG16" in text and "decoder ResBlock stages batch_norm" in text
    assert "phase 3" in text and "SSIM high" in text
    with pytest.raises(ExperimentError, match="needs lpips_weights"):
        run_experiment("dcae_adaptation", "full", {}, runs_root=tmp_path / "none")
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_dcae_uvit_token_and_flop_ratios():
    from experiments.dcae_uvit import AUTOENCODERS, Config, measure

    cfg = Config(resolution=128, width=32, depth=2, heads=2, batch=1, repeats=1, dtype="float32")
    (_, c8, f8, p8), _, (_, c64, f64, p64) = AUTOENCODERS
    r8, r64 = measure(cfg, c8, f8, p8), measure(cfg, c64, f64, p64)
    assert (r8["tokens"], r64["tokens"]) == (64, 4)
    assert r8["fwd_GFLOPs"] / r64["fwd_GFLOPs"] > 4  # 16x fewer tokens; patch-embed and output convs do not shrink
    assert r8["train_GFLOPs"] > 2 * r8["fwd_GFLOPs"]


def test_dcae_residual_claim_verdict():
    from experiments.dcae_residual import claim_verdict

    factors = (8, 16, 32)
    grows = np.array([[1.0, 1.2, 0.9], [3.0, 3.5, 2.8], [6.0, 7.0, 6.5]])  # [factors, seeds] gains in dB
    assert claim_verdict(factors, grows).startswith("MET: mean gain f8 +1.03, f16 +3.10, f32 +6.50 dB")
    assert claim_verdict(factors, grows[::-1]).startswith("NOT MET: the gain shrinks")
    noisy = np.array([[1.0, 1.2], [3.0, 3.5], [0.5, 2.0]])
    assert claim_verdict(factors, noisy).startswith("cannot tell: the interval includes 0")
    bump = np.array([[1.0, 1.1, 1.2], [9.0, 9.0, 9.0], [6.0, 6.1, 6.0]])
    assert claim_verdict(factors, bump).startswith("cannot tell: the mean gain does not rise at every factor")
    assert "one seed gives no noise estimate" in claim_verdict(factors, grows[:, :1])
    with pytest.raises(ValueError, match="gains must be"):
        claim_verdict(factors, grows[:2])
