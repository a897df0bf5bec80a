"""Multi-host setup, device meshes, global arrays and failure propagation.

JAX is multi-controller: every host runs the same program. `maybe_initialize()` calls
`jax.distributed.initialize()` only when a cluster environment is detected (Cloud TPU pods set
`TPU_WORKER_HOSTNAMES` / `MEGASCALE_*`, Slurm sets `SLURM_JOB_ID` with several tasks, Open MPI sets
`OMPI_COMM_WORLD_SIZE`, or the user sets `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`).

Data parallelism over all processes' devices: `replicate` puts a pytree (parameters, optimiser state) on a mesh as
global fully replicated `jax.Array`s, `process_rows` says which rows of a global batch this process feeds,
`shard_batch` assembles the per-process rows into a global batch sharded over the mesh's data axis (or
`shard_global_batch` takes them from a whole batch that every process built alike), `to_host` brings any
global array back as numpy on every process and `to_local` onto this process's device (for evaluation after
training). A failure on one process stops all (`fail_all`), see
docs/multihost.md.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback

import numpy as np

_initialized = False
_FAILED_DIR = "jaxeff_failed/"  # key-value directory in the coordination service where a failing process reports
_POLL_SECONDS = 0.5
_watch_stop = threading.Event()
_at_failure: list = []  # callbacks run before a failing or stopped process exits (e.g. mark a run directory failed)


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
    """Initialise the JAX distributed runtime when running multi-process; returns whether it did.

    Also starts a watcher thread that stops this process as soon as another one reports a failure (`fail_all`),
    so an error on any process ends the job in about a second instead of hanging in a collective."""
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
        missing = slurm_step_missing()
        if missing:
            raise RuntimeError(f"a Slurm job with SLURM_NTASKS={os.environ['SLURM_NTASKS']}, but {', '.join(missing)} "
                               "unset: start the command with srun (one srun task per JAX process)")
        jax.distributed.initialize(local_device_ids=slurm_local_device_ids())
    _initialized = True
    threading.Thread(target=_watch_failures, name="jaxeff-failure-watch", daemon=True).start()
    atexit.register(_watch_stop.set)  # runs before jax's own shutdown hook (registered earlier), see _watch_failures
    return True


# what JAX's Slurm detection (jax._src.clusters.slurm_cluster) reads: set inside an srun step
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def slurm_step_missing(env: dict[str, str] | None = None) -> list[str]:
    """The variables JAX needs to set itself up from Slurm that are unset (e.g. `python` run straight from an
    sbatch script with several tasks, not through srun)."""
    env = dict(os.environ if env is None else env)
    return [v for v in SLURM_STEP_VARS if v not in env]


def slurm_local_device_ids(env: dict[str, str] | None = None) -> list[int] | None:
    """The GPUs this Slurm task drives, or None for JAX's default (the one GPU numbered `SLURM_LOCALID`).

    - one task per node: all the node's GPUs (`SLURM_GPUS_ON_NODE`; JAX alone would leave 7 of 8 idle);
    - a task that Slurm bound to one GPU (`--gpus-per-task=1` / `--gpu-bind`: `CUDA_VISIBLE_DEVICES` names one
      GPU, which the process sees as GPU 0): [0], not `SLURM_LOCALID`, which would name a GPU it cannot see;
    - otherwise (one task per GPU, every GPU visible): None."""
    env = dict(os.environ if env is None else env)
    if "SLURM_JOB_ID" not in env:
        return None
    visible = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    tasks, nodes = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS")), env.get("SLURM_STEP_NUM_NODES",
                                                                                      env.get("SLURM_NNODES"))
    if tasks is not None and nodes is not None and int(tasks) == int(nodes):
        if "SLURM_GPUS_ON_NODE" in env:
            return list(range(int(env["SLURM_GPUS_ON_NODE"])))
        return list(range(len(visible))) if visible else None
    return [0] if len(visible) == 1 else None


def is_initialized() -> bool:
    """Whether `maybe_initialize` started the distributed runtime (a multi-process run)."""
    return _initialized


def is_main() -> bool:
    """Process 0: the one that writes run directories, logs and progress bars."""
    import jax

    return jax.process_index() == 0


def _client():
    from jax._src import distributed as jax_distributed  # the coordination-service client has no public handle

    return jax_distributed.global_state.client


def at_failure(callback) -> None:
    """Run `callback()` if this process is stopped by `fail_all` or by another process's failure."""
    _at_failure.append(callback)


def _exit_now(code: int) -> None:
    for callback in _at_failure:
        try:
            callback()
        except Exception as e:  # exiting matters more than tidying up
            print(f"jaxeff: cleanup {callback} failed: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skips jax's atexit shutdown barrier, which would wait for the stopped processes


def _watch_failures() -> None:
    import jax

    me, errors = jax.process_index(), 0
    while not _watch_stop.wait(_POLL_SECONDS):
        try:
            reports = _client().key_value_dir_get(_FAILED_DIR)
            errors = 0
        except Exception as e:  # the coordinator (process 0) is gone
            errors += 1
            if errors < 3 or _watch_stop.is_set():
                continue
            print(f"jaxeff: process {me}: lost the coordination service ({type(e).__name__}); process 0 has "
                  "stopped, see its log", file=sys.stderr)
            _exit_now(1)
        others = [(k, v) for k, v in reports if not k.endswith(f"/{me}")]
        if others and not _watch_stop.is_set():
            for _, message in others:
                print(f"jaxeff: process {me} stops because {message}", file=sys.stderr)
            _exit_now(1)


def fail_all(exc: BaseException, code: int = 1) -> None:
    """Report `exc` to every process, print it, and exit this process now (multi-process runs only).

    The other processes' watchers exit within about a second; process 0 hosts the coordination service, so it
    waits a few polls before exiting to let them read the message."""
    import jax

    _watch_stop.set()
    me = jax.process_index()
    traceback.print_exception(exc)
    message = f"process {me} of {jax.process_count()} failed: {type(exc).__name__}: {exc}"
    print(f"jaxeff: {message}; stopping all processes", file=sys.stderr)
    try:
        # a peer that failed first (and so broke this process's collective) has reported its error: name it
        for key, other in _client().key_value_dir_get(_FAILED_DIR):
            if not key.endswith(f"/{me}"):
                print(f"jaxeff: process {me} stops because {other}", file=sys.stderr)
        _client().key_value_set(f"{_FAILED_DIR}{me}", message)
    except Exception:  # the service went with process 0; exiting still frees the others (heartbeat timeout)
        print(f"jaxeff: process {me}: lost the coordination service; process 0 has stopped, see its log",
              file=sys.stderr)
    if me == 0:
        time.sleep(4 * _POLL_SECONDS)
    _exit_now(code)


def broadcast_str(text: str, max_bytes: int = 4096) -> str:
    """Process 0's `text` on every process (e.g. a run directory named after process 0's clock); a collective:
    every process calls it with the same `max_bytes`."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return text
    raw = text.encode()
    if len(raw) > max_bytes:
        raise ValueError(f"broadcast_str: {len(raw)} bytes > max_bytes={max_bytes}")
    buf = np.zeros(max_bytes + 4, np.uint8)
    buf[:4] = np.frombuffer(np.uint32(len(raw)).tobytes(), np.uint8)
    buf[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    n = int(np.frombuffer(out[:4].tobytes(), np.uint32)[0])
    return out[4:4 + n].tobytes().decode()


def make_mesh(shape: tuple[int, ...] | None = None, axis_names: tuple[str, ...] = ("data",), devices=None):
    """A mesh over all (global) devices with Auto axes; data parallel over every device by default.

    The default (`shape=None`) orders devices by process, so each process's devices hold one contiguous block of
    rows of a batch sharded over the first axis (`process_rows`); an explicit shape uses `jax.make_mesh`'s
    topology-aware order."""
    import jax
    from jax.sharding import AxisType, Mesh

    devices = list(jax.devices() if devices is None else devices)
    axis_types = (AxisType.Auto,) * len(axis_names)
    if shape is None:
        shape = (len(devices),) + (1,) * (len(axis_names) - 1)
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        return Mesh(np.array(ordered, dtype=object).reshape(shape), axis_names, axis_types=axis_types)
    return jax.make_mesh(shape, axis_names, axis_types=axis_types, devices=devices)


def data_mesh(global_batch: int, axis: str = "data"):
    """The data-parallel mesh (`make_mesh`) over every device when `global_batch` divides among them, else over
    the most devices that it does, the same number from every process (e.g. batch 4 on 8 devices: 4 of them).
    Raises ValueError when `global_batch` is not a multiple of the process count."""
    import jax

    n_proc, local = jax.process_count(), jax.local_device_count()
    per_process = next((k for k in range(local, 0, -1) if global_batch % (k * n_proc) == 0), None)
    if per_process is None:
        raise ValueError(f"global batch {global_batch} cannot be split evenly over {n_proc} processes")
    by_process: dict[int, list] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    return make_mesh(axis_names=(axis,), devices=[d for ds in by_process.values() for d in ds[:per_process]])


def replicate(tree, mesh):
    """`tree` as global `jax.Array`s fully replicated on `mesh` (every process must pass the same values).

    Goes through host memory: meant for parameters and optimiser state built by each process from the same seed."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
        return jax.device_put(np.asarray(jax.device_get(x)), sharding)

    return jax.tree.map(put, tree)


def process_rows(mesh, global_batch: int, axis: str = "data") -> tuple[int, int]:
    """The rows [start, stop) of a global batch, sharded over `axis`, that live on this process's devices."""
    from jax.sharding import NamedSharding, PartitionSpec

    size = mesh.shape[axis]
    if global_batch % size:
        raise ValueError(f"global batch {global_batch} is not divisible by the {size} devices of mesh axis {axis!r}")
    slices = NamedSharding(mesh, PartitionSpec(axis)).addressable_devices_indices_map((global_batch,)).values()
    rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in slices})
    for (_, stop), (start, _) in zip(rows, rows[1:], strict=False):
        if stop != start:
            raise ValueError(f"this process's devices hold non-contiguous rows {rows} of the batch; use a mesh "
                             "whose data axis keeps each process's devices together (jaxeff.distributed.make_mesh)")
    return rows[0][0], rows[-1][1]


def shard_batch(local_batch, mesh, axis: str = "data"):
    """Global batch arrays sharded over `axis` from this process's rows (`process_rows`) of every leaf."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def shard_global_batch(global_batch, mesh, axis: str = "data"):
    """Like `shard_batch`, from the whole global batch (every leaf [B, ...], the same on every process, e.g. drawn
    from a generator seeded alike): each process keeps its rows (`process_rows`) and they become one global batch
    sharded over `axis`. For cheap synthetic data; a real data set should read only its rows (`index_batches`)."""
    import jax

    leaves = jax.tree.leaves(global_batch)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"shard_global_batch: the leaves' leading (batch) sizes differ: {sorted(map(str, sizes))}")
    start, stop = process_rows(mesh, sizes.pop(), axis)
    return shard_batch(jax.tree.map(lambda x: np.asarray(x)[start:stop], global_batch), mesh, axis)


def to_host(tree):
    """numpy copies of a pytree of arrays on every process, whether local, replicated or sharded over several
    processes' devices (those are gathered: a collective, every process must call it)."""
    import jax
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def to_local(tree):
    """`tree` (e.g. a trained state of global arrays) as arrays on this process's default device, the same on
    every process, for process-local work after training (evaluation, sampling, export); gathers like
    `to_host`, PRNG key arrays included."""
    import jax

    def local(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(local(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.device_put(to_host(x))  # uncommitted, on the default (local) device

    return jax.tree.map(local, tree)
