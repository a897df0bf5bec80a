"""HART cost model: analytic MACs agree with XLA's cost analysis; full-size numbers; experiment input checks."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxeff.hart import dit
from jaxeff.hart.macs import dit_macs, hart_macs
from jaxeff.hart.tokenizer import HARTTokenizer, TokenizerConfig
from jaxeff.hart.transformer import HARTConfig, HARTTransformer, SampleOptions, generate_fhat

PNS = (1, 2, 3, 4, 6, 8)


def _xla_macs(fn, *args):
    ca = jax.jit(fn).lower(*args).cost_analysis()
    return float((ca[0] if isinstance(ca, list | tuple) else ca)["flops"]) / 2


def test_analytic_macs_match_xla():
    cfg = HARTConfig(embed_dim=256, depth=2, num_heads=4, context_token=16, context_dim=64, vocab_size=256, cvae=8,
                     patch_nums=PNS, diff_width=256, diff_depth=2)
    tcfg = TokenizerConfig(vocab_size=256, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8,
                           patch_nums=PNS)
    gd, st = nnx.split(nnx.eval_shape(lambda: (HARTTransformer(cfg, rngs=nnx.Rngs(0)),
                                               HARTTokenizer(tcfg, rngs=nnx.Rngs(0)).quantize)))
    ctx = jax.ShapeDtypeStruct((1, 16, 64), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, 16), jnp.int32)

    def gen(s, c, p):
        m, q = nnx.merge(gd, s)
        return generate_fhat(m, q, c, p, jax.random.key(0), SampleOptions(cfg=2.0))

    assert _xla_macs(gen, st, ctx, pos) == pytest.approx(hart_macs(cfg)["total"], rel=0.05)
    dcfg = dit.DiTConfig(hidden=256, depth=2, num_heads=4, latent_size=16, context_token=16, context_dim=64)
    g2, s2 = nnx.split(nnx.eval_shape(lambda: dit.DiT(dcfg, rngs=nnx.Rngs(0))))
    x = _xla_macs(lambda s, c: dit.ddim_sample(nnx.merge(g2, s), c, jax.random.key(0), steps=3), s2, ctx)
    assert x == pytest.approx(dit_macs(dcfg, steps=3)["total"], rel=0.05)


def test_full_size_macs_and_ratio():
    h = hart_macs(HARTConfig())
    d = dit_macs(dit.DiTConfig(), steps=20)
    assert 14e12 < h["transformer"] < 16e12 and 2e12 < h["diffusion"] < 3e12  # ~14.7 + ~2.4 TMACs
    assert 5 < d["total"] / h["total"] < 14


def test_hart_1024_rejects_bad_input(tmp_path):
    from jaxeff.experiment import ExperimentError, run_experiment

    with pytest.raises(ExperimentError, match="both ckpt"):
        run_experiment("hart_1024", "smoke", {"ckpt": str(tmp_path), "text_encoder": "none"},
                       runs_root=tmp_path / "runs")
    with pytest.raises(ExperimentError, match="is not 'hf:"):
        run_experiment("hart_1024", "smoke", {"ckpt": "hf:no-repo"}, runs_root=tmp_path / "runs")
    with pytest.raises(ExperimentError, match="not a directory"):
        run_experiment("hart_1024", "smoke", {"ckpt": str(tmp_path / "nope"), "text_encoder": str(tmp_path)},
                       runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_hart_1024_downloads_the_released_weights_by_default_and_says_when_offline(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    from jaxeff.experiment import run_experiment
    from jaxeff.io import hub

    asked = []

    def offline(repo_id, **kwargs):
        asked.append(repo_id)
        raise LocalEntryNotFoundError("no network and nothing cached")

    monkeypatch.setattr(hub, "_snapshot", offline)
    run = run_experiment("hart_1024", "smoke", {"run_tiny": "false"}, runs_root=tmp_path)
    assert asked == ["mit-han-lab/hart-0.7b-1024px"]
    text = (run.dir / "results.md").read_text()
    assert "released weights not available" in text and "seems offline" in text
    assert "DiT / HART MAC ratio" in text  # then the no-weights path ran


def test_hart_experiment_sampling_and_training_overrides():
    from jaxeff.experiment import ExperimentError, get, make_config

    assert make_config(get("hart_1024"), "smoke", {"num_maskgit_iters": "4"}).num_maskgit_iters == 4
    with pytest.raises(ExperimentError, match="num_maskgit_iters"):
        make_config(get("hart_1024"), "smoke", {"num_maskgit_iters": "0"})
    assert make_config(get("hart_tiny"), "smoke", {}).cond_drop == "official"
    assert make_config(get("hart_tiny"), "smoke", {"cond_drop": "uniform"}).cond_drop == "uniform"
    with pytest.raises(ExperimentError, match="cond_drop"):
        make_config(get("hart_tiny"), "smoke", {"cond_drop": "rand"})
