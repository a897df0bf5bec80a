"""Execute notebooks headlessly (what `make notebooks` and the test suite run).

`python notebooks/execute.py notebooks/*.ipynb`; set JAXEFF_NOTEBOOK_SMOKE=1 for the CPU smoke setting.
Executed copies are written to runs/notebooks/ so the sources stay clean.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path: str | Path, timeout: int = 900) -> Path:
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": os.getcwd()}})
    client.execute()
    out_dir = Path("runs/notebooks")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    nbformat.write(nb, out)
    return out


def main(paths: list[str]) -> int:
    os.environ.setdefault("JAXEFF_NOTEBOOK_SMOKE", "1")
    for p in paths:
        t = time.time()
        out = execute(p)
        print(f"executed {p} in {time.time() - t:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
