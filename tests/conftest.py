"""The suite runs on CPU unless JAX_PLATFORMS is set: CI has no accelerator, and CPU keeps results reproducible.

`make test-device` sets JAX_PLATFORMS to empty (jax then takes the machine's GPU/TPU) to run the pallas tests,
including the compiled-kernel ones, on the accelerator; float32 matmuls are then pinned to full precision so the
tolerances written for CPU hold (GPUs default to TF32). No backend is initialised here: tests/multidevice sets
its device count after this file runs.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

if os.environ["JAX_PLATFORMS"] != "cpu":
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")


SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_data():
    """`shared_data("hart_golden")` -> ../shared/data/hart_golden, or skips the test when that folder is absent:
    ../shared (reference data beside the checkout) exists in CI but not in a user's clone."""
    def get(name: str) -> Path:
        path = SHARED / "data" / name
        if not path.is_dir():
            pytest.skip(f"{path} is absent: the ../shared reference data beside the checkout (present in CI) is "
                        f"not part of a clone")
        return path
    return get
