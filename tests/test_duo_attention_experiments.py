"""The passkey demos (`duo_attention_passkey`, `lserve_needle`) share one `llama_passkey` model: the export in
`checkpoints/` is taken only while its stamp says today's preset made it, else the smoke model is trained (faked
here: no training in tests) and exported there for the next demo; lserve_needle takes a DuoAttention pattern only
of that very export."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx

from experiments.llama_passkey import export_model
from jaxeff import duo_attention as da
from jaxeff.duo_attention import evaluation
from jaxeff.experiment import Run, get, make_config
from jaxeff.models.llama import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1)


def _train(runs_root: Path, preset: str, overrides: dict, export: str) -> Run:
    """What a llama_passkey run leaves: its config.json (as the runner writes it) and a stamped export."""
    runs = sorted((runs_root / "llama_passkey").glob("*"))
    run = Run("llama_passkey", preset, None, runs_root / "llama_passkey" / str(len(runs)))
    run.dir.mkdir(parents=True)
    run.save_json("config.json", {"experiment": "llama_passkey", "preset": preset,
                                  "config": make_config(get("llama_passkey"), preset, overrides)})
    export_model(Llama(TINY, rngs=nnx.Rngs(0)), Path(export), run)
    return run


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """A demo's run under tmp_path/runs, the working directory tmp_path, and run_experiment faked: it records the
    call and exports as llama_passkey would (default export_dir: checkpoints/llama_passkey_<preset>)."""
    monkeypatch.chdir(tmp_path)
    trained = []

    def fake_run_experiment(name, preset, overrides=None, *, runs_root):
        assert name == "llama_passkey" and not overrides  # the default export_dir, the one the demos read
        trained.append(_train(Path(runs_root), preset, {}, evaluation.passkey_export_dir(preset)))
        return trained[-1]

    monkeypatch.setattr(evaluation, "run_experiment", fake_run_experiment)
    return SimpleNamespace(dir=tmp_path / "runs" / "duo_attention_passkey" / "1"), trained


def test_passkey_demos_share_the_current_llama_passkey_export(demo, tmp_path):
    run, trained = demo
    smoke = "checkpoints/llama_passkey_smoke"
    path, note = evaluation.resolve_model("", run)  # nothing yet: trained once, exported to checkpoints/
    assert path == smoke and len(trained) == 1 and "no llama_passkey export existed" in note
    assert json.loads((tmp_path / smoke / "passkey_task.json").read_text())["run"] == str(trained[0].dir)
    path, note = evaluation.resolve_model("", run)  # the next demo takes it
    assert path == smoke and len(trained) == 1 and str(trained[0].dir) in note

    stamp = tmp_path / smoke / "passkey_task.json"  # evaluation / export settings do not change the model: taken
    old = json.loads(stamp.read_text())
    assert {"eval_examples", "export_dir"} <= set(evaluation.NOT_MODEL_FIELDS) <= set(old["config"])
    stamp.write_text(json.dumps(old | {"config": old["config"] | {"eval_examples": 3, "export_dir": "elsewhere"}}))
    assert evaluation.resolve_model("", run)[0] == smoke and len(trained) == 1

    # from an older smoke preset: retrained, and the note says why
    stamp.write_text(json.dumps(old | {"config": old["config"] | {"steps": 7}}))
    path, note = evaluation.resolve_model("", run)
    assert path == smoke and len(trained) == 2 and "steps: 7 -> 1500" in note
    stamp.unlink()  # code older than the stamp, or an export interrupted before its stamp
    path, note = evaluation.resolve_model("", run)
    assert len(trained) == 3 and "carries no stamp" in note
    _train(tmp_path / "runs", "smoke", {"num_heads": "4"}, smoke)  # a run with overrides is not today's preset
    assert "num_heads: 4 -> 2" in evaluation.resolve_model("", run)[1] and len(trained) == 4

    _train(tmp_path / "runs", "full", {}, "checkpoints/llama_passkey_full")  # the full preset's comes first
    assert evaluation.resolve_model("", run)[0] == "checkpoints/llama_passkey_full" and len(trained) == 4
    full_stamp = tmp_path / "checkpoints/llama_passkey_full/passkey_task.json"
    full_stamp.write_text(json.dumps(json.loads(full_stamp.read_text()) | {"preset": "smoke"}))
    assert evaluation.resolve_model("", run)[0] == smoke  # a smoke model exported as full is not taken


def test_lserve_needle_takes_a_pattern_only_of_the_same_llama_passkey_training(demo, tmp_path):
    """Two duo_attention_passkey patterns name the shared export's path; the newer one was identified on an earlier
    model exported there (another training run in its stamp) and is passed over."""
    from experiments.lserve_needle import Config, find_pattern

    run, _ = demo
    model_dir, _ = evaluation.resolve_model("", run)
    made_by = evaluation.passkey_stamp(model_dir)["run"]
    runs = tmp_path / "runs"
    for stamp, model_run, value in [("1", made_by, 0.25), ("2", str(runs / "llama_passkey" / "earlier"), 0.75)]:
        da.save_pattern(runs / "duo_attention_passkey" / stamp / "pattern", np.full((1, 1), value), 16, 64,
                        model_name=model_dir, model_run=model_run)
    needle = SimpleNamespace(dir=runs / "lserve_needle" / "3", is_main=True)
    alpha, source = find_pattern(Config(), None, str(tmp_path / model_dir), needle)
    np.testing.assert_array_equal(alpha, np.full((1, 1), 0.25))
    assert str(runs / "duo_attention_passkey" / "1" / "pattern") in source
