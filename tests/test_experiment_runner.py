"""The experiment runner: registry, presets, override validation, run directories, resume."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxeff import experiment
from jaxeff.data import CharTokenizer
from jaxeff.experiment import ExperimentError, make_config, run_experiment


def test_unknown_experiment_exits_2_listing_names(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxeff.run", "name=no_such_thing", f"runs_root={tmp_path}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown experiment 'no_such_thing'" in proc.stderr and "llama_passkey" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, fragment", [
    ({"no_such_key": "1"}, "unknown key 'no_such_key'"),
    ({"steps": "many"}, "bad value for steps='many'"),
    ({"context": "40"}, "too short"),
    ({"eval_contexts": "256,x"}, "bad value for eval_contexts"),
])
def test_bad_override_is_named_and_creates_nothing(override, fragment, tmp_path):
    with pytest.raises(ExperimentError, match=fragment):
        run_experiment("llama_passkey", "smoke", override, runs_root=tmp_path)
    assert not (tmp_path / "llama_passkey").exists()


def test_make_exp_bad_override_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxeff.run", "name=llama_passkey", "preset=smoke", "steps=1.5",
         f"runs_root={tmp_path}"],
        capture_output=True, text=True)
    assert proc.returncode == 2 and "steps" in proc.stderr


def test_config_types_and_presets():
    exp = experiment.get("llama_passkey")
    cfg = make_config(exp, "smoke", {"eval_contexts": "128,256", "lr": "1e-3", "interrupt_at_step": "none"})
    assert cfg.eval_contexts == (128, 256) and cfg.lr == 1e-3 and cfg.interrupt_at_step is None
    assert cfg.steps == exp.presets["smoke"]["steps"]
    with pytest.raises(ExperimentError, match="no preset"):
        make_config(exp, "huge", {})


TINY = {"context": "128", "batch_size": "4", "hidden_size": "32", "intermediate_size": "64", "num_layers": "1",
        "num_heads": "2", "num_kv_heads": "1", "steps": "8", "eval_every": "100", "eval_examples": "4",
        "eval_contexts": "128", "checkpoint_every": "3", "curriculum": ""}


def _params(run):
    from jaxeff.io.safetensors import load_file
    return load_file(run.dir / "model" / "model.safetensors")


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path):
    full = run_experiment("llama_passkey", "smoke", TINY | {"export_dir": str(tmp_path / "a")},
                          runs_root=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_experiment("llama_passkey", "smoke", TINY | {"interrupt_at_step": "5", "export_dir": str(tmp_path / "b")},
                       runs_root=tmp_path / "cut")
    resumed = run_experiment("llama_passkey", "smoke", TINY | {"export_dir": str(tmp_path / "b")},
                             runs_root=tmp_path / "cut", resume=True)
    assert resumed.resumed
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the run directory holds what a user looks at
    for name in ("config.json", "metrics.jsonl", "results.md", "passkey.png"):
        assert (resumed.dir / name).exists(), name
    steps = [json.loads(line)["step"] for line in (resumed.dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 8
    # generate's default stop ids are the export's: the tokenizer's <eos>, never a character (a digit of the key)
    exported = json.loads((tmp_path / "b" / "config.json").read_text())
    assert exported["eos_token_id"] == CharTokenizer().eos_id >= 128


def test_registry_lists_every_experiment_file_and_imports_cleanly():
    import pkgutil

    import experiments

    registry = experiment.load_all()
    assert not experiment._IMPORT_ERRORS, experiment._IMPORT_ERRORS
    modules = {m.name for m in pkgutil.iter_modules(experiments.__path__) if not m.name.startswith("_")}
    registered_from = {e.fn.__module__.split(".")[-1] for e in registry.values()}
    assert modules == registered_from
    for exp in registry.values():  # every preset's values fit its config class
        for values in exp.presets.values():
            exp.config_cls(**values)


def test_only_process_0_writes(tmp_path, monkeypatch):
    from jaxeff import distributed

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    run = experiment.Run("x", "smoke", {}, tmp_path / "run")
    run.log(1, loss=0.5)
    run.results([{"a": 1}])
    run.save_json("config.json", {"a": 1})
    run.savez("a.npz", x=np.zeros(2))
    run.print("not printed")
    assert not (tmp_path / "run").exists()
    assert run.progress(range(3)).disable


def test_no_experiment_imports_another():
    """An experiment is one file; what two experiments share lives in the jaxeff package."""
    import ast
    from pathlib import Path

    import experiments

    for path in sorted(Path(experiments.__path__[0]).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "experiments"], f"{path.name} imports {names}"


def test_timing_and_image_grid_helpers():
    calls = []
    times = experiment.call_times(lambda x: calls.append(x) or np.zeros(3), 1, repeats=4)
    assert len(calls) == 5 and len(times) == 4 and min(times) >= 0  # one warm-up call, then the timed ones
    assert experiment.best_time(lambda: np.zeros(3), repeats=2) >= 0
    fig = experiment.image_grid(np.zeros((5, 4, 4)), 2, 3, cell=0.5, cmap="gray")
    assert len(fig.axes) == 6 and tuple(fig.get_size_inches()) == (1.5, 1.0)
    assert sum(bool(ax.images) for ax in fig.axes) == 5


WRITES = {"open", "savefig", "save", "savez", "savez_compressed", "write_text", "write_bytes", "save_pretrained",
          "dump", "imsave", "imwrite", "mkdir", "to_csv"}


def _unguarded_writes(tree) -> list[str]:
    """Calls that write files, outside `Run`'s methods (`run.savefig`, ...) and outside `if run.is_main:` blocks."""
    import ast

    found = []

    def visit(node, guarded):
        if isinstance(node, ast.If) and "is_main" in ast.unparse(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, guarded)
            return
        if isinstance(node, ast.Call) and not guarded:
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            through_run = isinstance(f, ast.Attribute) and ast.unparse(f.value) == "run"
            receiver = ast.unparse(f.value) if isinstance(f, ast.Attribute) else ""
            if name in WRITES and not through_run and not (name == "save" and receiver not in ("np", "numpy")):
                found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def test_experiments_write_files_only_through_the_runner():
    """Only process 0 writes a run (docs/multihost.md): every file write in an experiment goes through `Run`
    (`savefig`, `save_json`, `savez`, `results`, `log`) or sits under `if run.is_main:`."""
    import ast
    from pathlib import Path

    import experiments

    bad = {}
    for path in sorted(Path(experiments.__path__[0]).glob("*.py")):
        found = _unguarded_writes(ast.parse(path.read_text()))
        if found:
            bad[path.name] = found
    assert not bad, bad
    # the check itself catches each kind of write
    sample = "def f(run, x):\n  open('a', 'w')\n  np.savez('b', x=x)\n  fig.savefig('c')\n  p.write_text('d')\n" \
             "  run.savefig(fig, 'ok')\n  ckpt.save(1, x)\n  if run.is_main:\n    open('ok', 'w')\n"
    assert [line.split(":")[0] for line in _unguarded_writes(ast.parse(sample))] == ["line 2", "line 3", "line 4",
                                                                                   "line 5"]


def test_wilson_interval():
    from jaxeff.experiment import wilson_interval

    np.testing.assert_allclose(wilson_interval(50, 100), (0.4038, 0.5962), atol=1e-4)
    lo, hi = wilson_interval(100, 100)
    assert 0.96 < lo < hi == pytest.approx(1.0)
    for n in (6, 21, 500):  # the formula rounds to just below 1 there; the interval must still hold p (error bars)
        assert wilson_interval(n, n)[1] >= 1.0 and wilson_interval(0, n)[0] <= 0.0
    assert all(np.isnan(wilson_interval(0, 0)))
