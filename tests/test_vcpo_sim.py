"""The asynchronous actor/learner simulation and the `vcpo_async` experiment at a tiny size (CPU)."""

import json

import numpy as np
import pytest

from jaxeff.experiment import ExperimentError, run_experiment
from jaxeff.vcpo import sim

TINY = {"lags": "0,2", "methods": "vcpo", "seeds": "2", "steps": "6", "eval_every": "3", "num_digits": "2",
        "num_layers": "1", "hidden_size": "16", "intermediate_size": "32", "prompts_per_step": "2",
        "group_size": "4", "variance_batches": "8", "smooth": "2", "lr": "0.05"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_experiment("vcpo_async", "smoke", TINY, runs_root=tmp_path_factory.mktemp("runs"))


def test_experiment_outputs_and_lag_semantics(tiny_run):
    d = tiny_run.dir
    for name in ("results.md", "metrics.jsonl", "summary.json", "curves.npz", "reward_vs_step.png",
                 "ess_gradnorm_vs_step.png", "accuracy_vs_k.png", "ess_before_collapse.png"):
        assert (d / name).is_file(), name
    curves = np.load(d / "curves.npz")
    ess, kl, lr_eff = curves["vcpo/ess_ratio"], curves["vcpo/kl_mu_pi_k3"], curves["vcpo/lr_eff"]
    assert ess.shape == (2, 2, 6) and curves["vcpo/greedy_accuracy"].shape == (2, 2, 2)
    for v in curves.values():
        assert np.isfinite(v).all()
    # k = 0: rollouts come from the current parameters, so the weights are 1 and the lr is not scaled.
    np.testing.assert_allclose(ess[0], 1.0, atol=1e-4)
    np.testing.assert_allclose(kl[0], 0.0, atol=1e-5)
    np.testing.assert_allclose(lr_eff[0], 0.05, rtol=1e-4)
    # k = 2: step 0 reads theta_0 (= current); later steps read older snapshots, so ESS < 1 and the lr shrinks
    # (except right after a step whose groups all had zero reward variance, which leaves the parameters as they were).
    np.testing.assert_allclose(ess[1, :, 0], 1.0, atol=1e-4)
    assert (ess[1, :, 1:] < 1.0 - 1e-6).mean() > 0.5 and (kl[1, :, 1:] >= 0).all() and (kl[1, :, 1:] > 0).any()
    assert (ess[1] <= 1.0 + 1e-5).all()
    np.testing.assert_allclose(lr_eff[1], 0.05 * np.sqrt(np.minimum(ess[1], 1.0)), rtol=1e-4)
    # Two seeds really differ.
    assert not np.allclose(curves["vcpo/reward"][:, 0], curves["vcpo/reward"][:, 1])
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary["grad_variance"]) == {"none", "group_mean", "opob_readme", "opob_code"}


def test_bad_config_is_rejected_before_the_run_directory(tmp_path):
    for override in ({"methods": "vcpo,sgd"}, {"lags": "-1"}, {"steps": "7", "eval_every": "3"},
                     {"opob_weighting": "paper"}, {"group_size": "1"}):
        with pytest.raises(ExperimentError):
            run_experiment("vcpo_async", "smoke", override, runs_root=tmp_path)
    assert not (tmp_path / "vcpo_async").exists()
    with pytest.raises(ValueError, match="linear in the advantage"):
        sim.Method("ppo_clip", "opob")
    with pytest.raises(ValueError, match="lags"):
        sim.run_grid(sim.SimConfig(max_lag=2), sim.METHODS["naive"], [3], [0])


def test_throughput_model_and_collapse_alarm():
    from experiments.vcpo_async import alarm_step, throughput_model

    rng = np.random.default_rng(0)
    fixed = throughput_model(rng, batch=8, len_mean=100.0, len_sigma=0.0, max_len=1000, train_cost=1.0)
    assert fixed["speedup_per_step"] == pytest.approx(1.0)  # equal lengths: no straggler time to save
    heavy = throughput_model(rng, batch=64, len_mean=100.0, len_sigma=1.0, max_len=1000, train_cost=1.0)
    assert heavy["E[max L]"] > 3 * heavy["E[L]"]
    assert heavy["speedup_per_step"] == pytest.approx((heavy["E[max L]"] + heavy["E[L]"]) / (2 * heavy["E[L]"]))
    ess = np.r_[np.ones(50), np.full(50, 0.01)]
    grad_norm = np.r_[np.ones(60), np.full(40, 10.0)]
    assert alarm_step(ess, grad_norm, 0.05, 3.0, 10) == 62  # both smoothed conditions hold from step 62 on
    assert alarm_step(ess, np.ones(100), 0.05, 3.0, 10) is None


def test_benchmark_steps_to_target_verdicts_and_usage(capsys):
    from benchmarks import vcpo as bench

    acc = np.array([[0.1, 0.3, 0.2, 0.35, 0.4], [0.1, 0.3, 0.2, 0.25, 0.4]])  # seed mean 0.1 .3 .2 .3 .4
    assert bench.steps_to_target(acc, 0.3, 10) == 40  # first reach at step 20 does not hold; from step 40 it does
    assert bench.steps_to_target(acc, 0.1, 10) == 10
    assert bench.steps_to_target(acc, 0.41, 10) is None
    assert sim.compare([0.5, 0.52], [0.3, 0.3]) == ("wins", pytest.approx(0.02))
    assert sim.compare([0.3, 0.5], [0.35, 0.35])[0] == "ties"  # within the 0.1 seed std
    assert sim.compare([0.2], [0.3])[0] == "loses"
    with pytest.raises(SystemExit) as e:  # benchmarks.parse_preset: usage, exit status 0
        bench.main(["--help"])
    assert e.value.code == 0 and "MODEL built from those measured inputs" in capsys.readouterr().out
    for argv in (["preset=huge"], ["lag=0"], ["steps=7"], ["lr=0.1"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
