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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_pin_installs_the_tested_code(path):
    """A notebook installs jaxeff at its pinned commit (`JAXEFF_REF`), while `test_notebook_executes` runs it against
    this checkout: the pin must be on main's history and its installed code identical to HEAD's, or Colab
    users would run code the suite never ran with these cells (an old pin once lacked a method the cells call)."""
    import sys

    sys.path.insert(0, str(path.parent))
    from pin import INSTALLED, git, pinned

    ref = pinned(path)
    assert ref, f"{path.name}: no pinned JAXEFF_REF"
    if git("cat-file", "-e", f"{ref}^{{commit}}").returncode:  # also when this is no git checkout
        pytest.skip(f"{ref} is not in this checkout's git history (not a git clone, or a shallow one)")
    assert git("merge-base", "--is-ancestor", ref, "HEAD").returncode == 0, f"{path.name}: {ref} is not on main"
    changed = git("diff", "--name-only", ref, "HEAD", "--", *INSTALLED).stdout.split()
    assert not changed, (f"{path.name} pins {ref[:7]}, but the installed code changed since ({len(changed)} files, "
                         f"e.g. {changed[:3]}): commit, then `make pin-notebooks` and commit the notebooks")
