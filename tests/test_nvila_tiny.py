"""nvila_tiny: the synthetic questions are right about their images, the pattern is lost in the low-resolution tile
and kept in the full-resolution ones, each mode gives the documented number of visual tokens, and the smoke preset
runs end to end at a tiny size."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.experiment import ExperimentError, run_experiment

TINY = {"vit_hidden": "16", "vit_layers": "2", "llm_hidden": "32", "llm_layers": "1"}


def test_dataset_answers_follow_the_rendered_objects():
    from experiments import nvila_tiny as T

    rng = np.random.default_rng(5)
    for _ in range(20):
        image, colours, pattern = T.render(rng)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and pattern in T.PATTERNS
        assert 1 <= len(colours) <= 4 and len(set(colours)) == len(colours)
        for colour in colours:  # every object's colour is drawn (some pixel close to it)
            assert (np.abs(image.astype(int) - T.COLOURS[colour]).sum(-1) < 60).any()
        for colour in set(T.COLOURS) - set(colours):
            assert not (np.abs(image.astype(int) - T.COLOURS[colour]).sum(-1) < 60).any()
        assert T.question(rng, "count", colours, pattern)[1] == str(len(colours))
        assert T.question(rng, "pattern", colours, pattern)[1] == pattern
        words, answer = T.question(rng, "colour", colours, pattern)
        assert answer == ("yes" if words[3] in colours else "no")
    data = T.make_dataset(9, seed=1)
    assert data["tiles"].shape == (9, 5, 32, 32, 3) and data["question"].shape == (9, T.Q_LEN)
    assert list(data["kind"]) == [0, 1, 2] * 3


def test_pattern_only_resolvable_at_full_resolution():
    """The construction the experiment rests on: the same scene with each pattern differs by a few grey levels in
    the low-resolution tile (under the background noise's std of 6) and by > 100 in the full-resolution tiles."""
    from experiments import nvila_tiny as T

    contrast = T.pattern_contrast(seed=3, images=4)
    assert contrast["low"] <= 5 and contrast["high"] > 100, contrast
    for a, b in (("horizontal", "vertical"), ("horizontal", "checked")):  # same mass, different pixels
        ma, mb = T.pattern_mask(a), T.pattern_mask(b)
        assert ma.sum() == mb.sum() and (ma != mb).any()


def test_visual_tokens_per_mode():
    from experiments import nvila_tiny as T

    cfg = T.Config(vit_hidden=16, vit_layers=2, llm_hidden=32, llm_layers=1)
    want = {"low-none": 64, "low-2x2": 16, "low-3x3": 9, "s2-none": 256, "s2-2x2": 64, "s2-3x3": 36}
    pixels = jax.ShapeDtypeStruct((2, 5, 32, 32, 3), jnp.float32)
    for mode, tokens in want.items():  # shapes only: traced, not run
        out = jax.eval_shape(lambda p, mode=mode: T.TinyVLM(cfg, mode, rngs=nnx.Rngs(0)).visual_tokens(p), pixels)
        assert out.shape == (2, tokens, 32), mode


def test_smoke_preset_runs_tiny(tmp_path):
    for bad, match in (({"modes": "s2-4x4"}, "unknown modes"), ({"patch": "5"}, "patch must divide"),
                       ({"vit_hidden": "24"}, "multiple of 16")):
        with pytest.raises(ExperimentError, match=match):
            run_experiment("nvila_tiny", "smoke", bad, runs_root=tmp_path)
    assert not any(tmp_path.iterdir())
    run = run_experiment("nvila_tiny", "smoke", {**TINY, "modes": "s2-3x3", "train_images": "12",
                                                 "eval_images": "9", "steps": "2", "batch_size": "4",
                                                 "eval_every": "1"}, runs_root=tmp_path)
    results = json.loads((run.dir / "results.json").read_text())
    rows = results["rows"]
    assert [r["mode"] for r in rows] == ["s2-3x3"] and rows[0]["visual LLM tokens"] == 36
    assert set(results["majority"]) == {"acc_pattern", "acc_count", "acc_colour"}
    metrics = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(0 <= m["acc"] <= 1 for m in metrics)
    assert all(lo <= m["acc_pattern"] <= hi for m in metrics for lo, hi in [m["ci_pattern"]])
    assert (run.dir / "accuracy.png").stat().st_size > 0 and "s2-3x3" in (run.dir / "results.md").read_text()
