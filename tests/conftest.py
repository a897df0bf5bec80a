"""The suite runs on CPU unless JAX_PLATFORMS is set: CI has no accelerator, and CPU keeps results reproducible.

`make test-device` sets JAX_PLATFORMS to empty (jax then takes the machine's GPU/TPU) to run the pallas tests,
including the compiled-kernel ones, on the accelerator; float32 matmuls are then pinned to full precision so the
tolerances written for CPU hold (GPUs default to TF32). No backend is initialised here: tests/multidevice sets
its device count after this file runs.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

if os.environ["JAX_PLATFORMS"] != "cpu":
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
