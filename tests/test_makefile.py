"""The Makefile passes a user's preset and overrides through to the experiment and benchmark scripts."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
@pytest.mark.parametrize("target,module", [("exp", "jaxeff.run name=vcpo_async"), ("bench", "benchmarks.vcpo")])
def test_make_passes_preset_and_overrides(target, module):
    """`make -n` (print, run nothing): a benchmark once lost `preset=full` and silently ran its smoke preset."""
    out = subprocess.run(["make", "-n", "-C", str(ROOT), target, "name=" + module.split("=")[-1].split(".")[-1],
                          "preset=full", "steps=7"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if f"-m {module}" in x)
    assert "preset=full" in line.split() and "steps=7" in line.split(), line
