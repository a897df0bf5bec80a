"""experiments/foreact_tabletop.py: the smoke path end to end with tiny overrides (through the runner), the toy's
pixel latent codec and the colour-permutation augmentation."""

import dataclasses
import json

import numpy as np
import pytest

from jaxeff.experiment import ExperimentError, run_experiment
from jaxeff.foreact import tabletop as T

TINY = {"demos": "1", "gen_episodes": "4", "gen_steps": "2", "gen_dim": "32", "gen_layers": "1", "gen_batch": "4",
        "policy_steps": "2", "policy_batch": "4", "eval_episodes": "3", "psnr_cases": "2", "sample_steps": "2"}


def test_smoke_preset_runs_tiny(tmp_path):
    with pytest.raises(ExperimentError, match="demos"):
        run_experiment("foreact_tabletop", "smoke", {**TINY, "demos": "0"}, runs_root=tmp_path)
    assert not any(tmp_path.iterdir())
    run = run_experiment("foreact_tabletop", "smoke", TINY, runs_root=tmp_path)
    results = json.loads((run.dir / "results.json").read_text())
    rows = results["success"]
    assert [(r["condition"], r["demos"]) for r in rows] == [(c, 1) for c in
                                                            ("task", "subtask", "subtask+gen", "subtask+true")]
    for r in rows:
        assert r["episodes"] == 3 and 0 <= r["ci95_low"] <= r["success"] <= r["ci95_high"] <= 1
    assert all(np.isfinite(q["value"]) for q in results["quality"]) and len(results["quality"]) == 4
    metrics = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("phase") == "generator"] == [1, 2]
    for name in ("success.png", "foresight_examples.png"):
        assert (run.dir / name).stat().st_size > 0
    assert "subtask+true" in (run.dir / "results.md").read_text()


def test_latent_codec_generators_and_augmentation():
    from experiments import foreact_tabletop as E

    episodes = E.expert_episodes(2, seed=0)
    data = E.bc_arrays(episodes)
    encode, decode = E.latent_codec(8)
    lat = np.asarray(encode(data["obs"]))
    assert lat.shape == (6, T.GRID, T.GRID, E.PIXEL_CHANNELS + 8)
    np.testing.assert_array_equal(np.asarray(decode(lat)), data["obs"])
    coords = lat[0, ..., E.PIXEL_CHANNELS:].reshape(T.CELLS, 8)
    assert len(np.unique(coords.round(5), axis=0)) == T.CELLS  # every cell has its own code
    caption, mask = E.ToyText(0)(list(T.SUBTASKS[:2]))
    cfg = E.Config(gen_dim=32, gen_layers=1, latent_coords=8)
    sana = E.gen_config(dataclasses.replace(cfg, generator="sana"))  # SANA's forward: tests/test_foreact.py
    assert sana.in_channels == sana.out_channels == lat.shape[-1] and sana.caption_channels == caption.shape[-1]
    (v,) = E.build_generator(cfg, caption.shape[1:])([lat[2:4]], [lat[:2]], np.array([999, 500]), caption, mask)
    # the untrained cell generator predicts the source frame: its velocity is (x_t - source) / sigma
    np.testing.assert_allclose(np.asarray(v), (lat[2:4] - lat[:2]) / np.array([0.999, 0.5])[:, None, None, None],
                               rtol=1e-5, atol=1e-5)

    # renaming colours 0 -> 1 -> 2 -> 0 keeps the expert's cells right for the renamed subtask
    perm = (1, 2, 0)
    swapped = E.permute_colours(data, perm)
    env = T.Tabletop().reset(np.random.default_rng(0), 0)
    renamed = T.Tabletop(env.gripper, env.pads[list(np.argsort(perm))], {k: [perm[b] for b in v]
                                                                        for k, v in env.stacks.items()})
    np.testing.assert_array_equal(E.permute_colours({**data, "obs": env.render()[None], "goal": env.render()[None],
                                                     "task": data["task"][:1], "subtask": data["subtask"][:1]},
                                                    perm)["obs"][0], renamed.render())
    sub = T.SUBTASKS[data["subtask"][0]]
    assert T.SUBTASKS[swapped["subtask"][0]] == " ".join(T.COLOURS[perm[T.COLOURS.index(w)]] if w in T.COLOURS
                                                         else w for w in sub.split())
    assert (swapped["pick"] == data["pick"]).all() and (swapped["place"] == data["place"]).all()
