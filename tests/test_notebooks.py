"""Every notebook executes on CPU in its smoke setting (what `make notebooks` does)."""

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted(Path(__file__).resolve().parent.parent.joinpath("notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch, tmp_path):
    import sys

    sys.path.insert(0, str(path.parent))
    from execute import execute

    monkeypatch.setenv("JAXEFF_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.chdir(tmp_path)
    out = execute(path)
    assert out.exists()
    assert os.path.getsize(out) > 0
