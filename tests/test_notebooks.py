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


def _git(*args):
    import subprocess

    root = Path(__file__).resolve().parent.parent
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_pin_has_what_it_imports(path):
    """A notebook installs jaxeff at its pinned commit (`JAXEFF_REF`) but its cells are today's: the pin must be in
    main's history, and every `from jaxeff... / pallas_kernels... import name` of its cells must exist there."""
    import ast
    import json
    import re

    cells = json.loads(path.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    ref = re.search(r'JAXEFF_REF", "([0-9a-f]{40})"', code)
    assert ref, f"{path.name}: no pinned JAXEFF_REF"
    ref = ref.group(1)
    if _git("cat-file", "-e", f"{ref}^{{commit}}").returncode:  # also when this is no git checkout
        pytest.skip(f"{ref} is not in this checkout's git history (not a git clone, or a shallow one)")
    assert _git("merge-base", "--is-ancestor", ref, "HEAD").returncode == 0, f"{path.name}: {ref} is not on main"
    source = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("!", "%")))
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.ImportFrom) and node.module
                and node.module.split(".")[0] in ("jaxeff", "pallas_kernels")):
            continue
        base = node.module.replace(".", "/")
        text = next((r.stdout for f in (f"{base}.py", f"{base}/__init__.py")
                     if (r := _git("show", f"{ref}:{f}")).returncode == 0), None)
        assert text is not None, f"{path.name}: {node.module} does not exist at {ref[:7]}"
        defined = set()  # top-level names of the pinned module: defs, classes, assignments, imports
        for top in ast.parse(text).body:
            if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(top.name)
            elif isinstance(top, (ast.Assign, ast.AnnAssign)):
                targets = top.targets if isinstance(top, ast.Assign) else [top.target]
                defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
                is_all = any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)
                if is_all and isinstance(top.value, (ast.List, ast.Tuple)):  # names served lazily, too
                    defined |= {e.value for e in top.value.elts if isinstance(e, ast.Constant)}
            elif isinstance(top, (ast.Import, ast.ImportFrom)):
                defined |= {(a.asname or a.name).split(".")[0] for a in top.names}
        for alias in node.names:
            submodule = (f"{ref}:{base}/{alias.name}{f}" for f in (".py", "/__init__.py"))
            exists = alias.name in defined or any(_git("cat-file", "-e", f).returncode == 0 for f in submodule)
            assert exists, f"{path.name}: {node.module}.{alias.name} does not exist at {ref[:7]}"
