"""What a run directory's results.md tells a reader on its own, and the runner's command-line messages."""

import dataclasses
import subprocess
import sys

import pytest

from jaxeff import experiment


@dataclasses.dataclass(frozen=True)
class _Cfg:
    value: int = 1


def _toy(cfg: _Cfg, run: experiment.Run) -> None:
    """Toy experiment: one table and one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run.results([{"value": cfg.value}], title="Table")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    run.savefig(fig, "curve.png")


def test_results_md_describes_the_run_and_links_its_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "_REGISTRY", {})
    experiment.register("toy_results", _Cfg, presets={"smoke": {}, "full": {"value": 2}})(_toy)
    monkeypatch.setattr(experiment, "load_all", lambda: dict(experiment._REGISTRY))
    run = experiment.run_experiment("toy_results", "full", {}, runs_root=tmp_path)
    text = (run.dir / "results.md").read_text()
    assert text.startswith("# toy_results (full)\n\nToy experiment: one table and one figure.\n")
    assert " s wall; jax " in text and "process(es)" in text
    assert "| 2 |" in text
    assert text.rstrip().endswith("![curve.png](curve.png)") and (run.dir / "curve.png").exists()


def test_unknown_name_suggests_the_closest(monkeypatch):
    with pytest.raises(experiment.ExperimentError, match="did you mean 'hart_1024'"):
        experiment.get("hart_102")


@pytest.mark.parametrize("argv, fragment", [(["--help"], "usage: python -m jaxeff.run"),
                                            (["name=llama_passkey", "smoke"], "arguments are key=value, got 'smoke'")])
def test_command_line_usage_messages(argv, fragment):
    with pytest.raises(experiment.ExperimentError, match=fragment):
        experiment.parse_argv(argv)


def test_benchmark_arguments_without_equals_give_usage():
    proc = subprocess.run([sys.executable, "-c", "import benchmarks; benchmarks.parse_preset(['steps'], {'a': {}})"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "arguments are key=value, got 'steps'; usage: preset=<a>" in proc.stderr
    # --help prints the script's docstring, or the usage line when it has none, and exits 0
    proc = subprocess.run([sys.executable, "-c", "import benchmarks; benchmarks.parse_preset(['--help'], {'a': {}})"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "usage: preset=<a> [option=<int> ...]"
