"""Multi-host setup and device meshes.

JAX is multi-controller: every host runs the same program. `maybe_initialize()` calls
`jax.distributed.initialize()` only when a cluster environment is detected (Cloud TPU pods set
`TPU_WORKER_HOSTNAMES` / `MEGASCALE_*`, Slurm sets `SLURM_JOB_ID` with several tasks, Open MPI sets
`OMPI_COMM_WORLD_SIZE`, or the user sets `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`).
"""

from __future__ import annotations

import os

_initialized = False


def cluster_detected(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ if env is None else env)
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize() -> bool:
    """Initialise the JAX distributed runtime when running multi-process; returns whether it did."""
    global _initialized
    if _initialized or not cluster_detected():
        return _initialized
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    _initialized = True
    return True


def make_mesh(shape: tuple[int, ...] | None = None, axis_names: tuple[str, ...] = ("data",), devices=None):
    """A mesh over all (global) devices with Auto axes; data parallel over every device by default."""
    import jax
    from jax.sharding import AxisType

    devices = list(jax.devices() if devices is None else devices)
    if shape is None:
        shape = (len(devices),) + (1,) * (len(axis_names) - 1)
    return jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(axis_names), devices=devices)
