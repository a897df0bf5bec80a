"""Pin every notebook's install cell to the commit whose library code the suite tests (`make pin-notebooks`).

A notebook installs jaxeff from git at `JAXEFF_REF` while the test suite executes it against the checkout, so the
pin must be a commit whose installed code (`INSTALLED`: the Python files of the packages pyproject.toml installs, and
pyproject.toml itself) equals the checkout's: the last commit that changed it.
`tests/test_notebooks.py` fails when the code changed after the pin; then run this and commit the notebooks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what `pip install jaxeff @ git+...` installs: [tool.setuptools.packages.find] and no package data
PACKAGES = ("jaxeff", "pallas_kernels", "experiments", "benchmarks")
INSTALLED = tuple(f":(glob){package}/**/*.py" for package in PACKAGES) + ("pyproject.toml",)
PIN = re.compile(r'(JAXEFF_REF\\", \\")([0-9a-f]{40})')  # as the install cell's source is stored in the JSON


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def installed_code_commit() -> str:
    """The newest commit that changed `INSTALLED` (raises RuntimeError outside a git checkout)."""
    out = git("log", "-1", "--format=%H", "--", *INSTALLED)
    if out.returncode or not out.stdout.strip():
        raise RuntimeError(f"no git history here: {out.stderr.strip()}")
    return out.stdout.strip()


def pinned(path: Path) -> str | None:
    """The commit a notebook's install cell pins, or None."""
    m = PIN.search(path.read_text())
    return m.group(2) if m else None


def main() -> int:
    dirty = git("status", "--porcelain", "--", *INSTALLED).stdout.strip()
    if dirty:
        print(f"commit these first, the pin must name a commit that has them:\n{dirty}")
        return 1
    ref = installed_code_commit()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        text = path.read_text()
        if not PIN.search(text):
            print(f"{path.name}: no JAXEFF_REF pin found")
            return 1
        path.write_text(PIN.sub(lambda m: m.group(1) + ref, text))
    print(f"notebooks pinned to {ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
