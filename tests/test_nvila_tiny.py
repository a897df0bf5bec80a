"""nvila_tiny: the synthetic questions are right about their images, each mode gives the documented number of
visual tokens, and the smoke preset runs end to end at a tiny size."""

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
        image, objects = T.render(rng)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert 1 <= len(objects) <= 4 and len({c for c, _ in objects}) == len(objects)
        for colour, _ in objects:  # every object's colour is drawn (some pixel close to it)
            assert (np.abs(image.astype(int) - T.COLOURS[colour]).sum(-1) < 60).any()
        words, answer = T.question(rng, "count", objects)
        assert answer == str(len(objects))
        words, answer = T.question(rng, "shape", objects)
        assert (words[4], answer) in objects
    data = T.make_dataset(9, seed=1)
    assert data["tiles"].shape == (9, 5, 32, 32, 3) and data["question"].shape == (9, T.Q_LEN)
    assert list(data["kind"]) == [0, 1, 2] * 3


def test_visual_tokens_per_mode():
    from experiments import nvila_tiny as T

    cfg = T.Config(vit_hidden=16, vit_layers=2, llm_hidden=32, llm_layers=1)
    want = {"low-none": 64, "low-2x2": 16, "low-3x3": 9, "s2-none": 256, "s2-2x2": 64, "s2-3x3": 36}
    pixels = jax.ShapeDtypeStruct((2, 5, 32, 32, 3), jnp.float32)
    for mode, tokens in want.items():  # shapes only: traced, not run
        out = jax.eval_shape(lambda p, mode=mode: T.TinyVLM(cfg, mode, rngs=nnx.Rngs(0)).visual_tokens(p), pixels)
        assert out.shape == (2, tokens, 32), mode


def test_smoke_preset_runs_tiny(tmp_path):
    with pytest.raises(ExperimentError, match="unknown modes"):
        run_experiment("nvila_tiny", "smoke", {"modes": "s2-4x4"}, runs_root=tmp_path)
    assert not any(tmp_path.iterdir())
    run = run_experiment("nvila_tiny", "smoke", {**TINY, "modes": "s2-3x3", "train_images": "12",
                                                 "eval_images": "9", "steps": "2", "batch_size": "4",
                                                 "eval_every": "1"}, runs_root=tmp_path)
    rows = json.loads((run.dir / "results.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["s2-3x3", "majority answer"] and rows[0]["visual LLM tokens"] == 36
    metrics = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(0 <= m["acc"] <= 1 for m in metrics)
    assert (run.dir / "accuracy.png").stat().st_size > 0 and "s2-3x3" in (run.dir / "results.md").read_text()
