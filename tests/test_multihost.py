"""Multi-process runs on 127.0.0.1: two JAX processes with 2 CPU devices each, launched as subprocesses.

llama_passkey trained data-parallel on 2 processes x 2 devices, killed (simulated preemption) and resumed, ends
with the parameters and loss of the same run on one process with 4 devices (same global batch); one run
directory, written by process 0 only. A failure on one process stops the other instead of hanging.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from jaxeff.data import index_batches

ROOT = Path(__file__).resolve().parents[1]
TINY = {"context": "128", "batch_size": "4", "hidden_size": "32", "intermediate_size": "64", "num_layers": "1",
        "num_heads": "2", "num_kv_heads": "1", "steps": "6", "eval_every": "100", "eval_examples": "4",
        "eval_contexts": "128", "checkpoint_every": "2", "curriculum": "", "lr": "1e-2", "warmup_steps": "2"}
TIMEOUT = 240  # per launch; a hang fails the test instead of blocking CI


def _free_port(low: int = 0) -> int:
    """A free port on 127.0.0.1: any, or the first free one from `low` up."""
    for port in ([0] if low == 0 else range(low, 65536)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port from {low}")


def _slurm_env(p: int, processes: int) -> dict[str, str]:
    """What `srun --ntasks=<processes>` sets on one node (127.0.0.1) for task `p`; JAX's Slurm detection derives
    the coordinator port from the job id (61440 + id % 4096), so the job id is chosen to hit a free port."""
    job = _free_port(61440) - 61440
    return {"SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": str(processes),
            "SLURM_PROCID": str(p), "SLURM_LOCALID": str(p), "SLURM_STEP_NUM_NODES": "1", "SLURM_NNODES": "1"}


def _launch(cmd: list[str], logs: Path, *, processes: int, devices: int, kill=None,
            launcher: str = "jax") -> list[tuple[int, str]]:
    """Run `cmd` as `processes` JAX processes with `devices` CPU devices each; returns [(returncode, output)].

    `launcher`: "jax" sets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, "slurm" the variables of
    an srun step (`_slurm_env`). `kill(procs)` (optional) runs while they are up."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1")
    port = _free_port()
    slurm = _slurm_env(0, processes) if launcher == "slurm" else {}
    procs, files = [], []
    for p in range(processes):
        if processes > 1 and launcher == "slurm":
            env.update(slurm, SLURM_PROCID=str(p), SLURM_LOCALID=str(p))
        elif processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(p))
        f = open(logs.with_name(f"{logs.name}.{p}.log"), "w+")
        files.append(f)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(env), stdout=f, stderr=subprocess.STDOUT))
    try:
        if kill is not None:
            kill(procs)
        deadline = time.time() + TIMEOUT
        for proc in procs:
            proc.wait(timeout=max(deadline - time.time(), 1))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = []
    for proc, f in zip(procs, files, strict=True):
        f.seek(0)
        out.append((proc.returncode, f.read()))
        f.close()
    return out


def _passkey(tmp: Path, runs: str, extra: dict, **kw):
    args = [f"{k}={v}" for k, v in (TINY | extra).items()]  # resume=true passes through as an argument too
    cmd = [sys.executable, "-m", "jaxeff.run", "name=llama_passkey", "preset=smoke", f"runs_root={tmp / runs}",
           f"export_dir={tmp / runs / 'export'}", *args]
    return _launch(cmd, tmp / runs, **kw)


def _run_dirs(tmp: Path, runs: str) -> list[Path]:
    return sorted(p for p in (tmp / runs / "llama_passkey").iterdir() if p.is_dir())


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    from jaxeff.io.safetensors import load_file

    return load_file(run_dir / "model" / "model.safetensors")


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"metrics written more than once: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_processes_killed_and_resumed_equal_one_process(tmp_path):
    with ThreadPoolExecutor(2) as pool:  # the reference run alongside the interrupted one: ~1/4 less wall time
        single = pool.submit(_passkey, tmp_path, "single", {}, processes=1, devices=4)
        cut = _passkey(tmp_path, "multi", {"interrupt_at_step": "3"}, processes=2, devices=2)
        (rc, log), = single.result()
    assert rc == 0, log[-3000:]
    for p, (rc, log) in enumerate(cut):
        assert rc != 0 and "interrupt_at_step=3" in log, (p, log[-3000:])
    resumed = _passkey(tmp_path, "multi", {"resume": "true"}, processes=2, devices=2)
    for p, (rc, log) in enumerate(resumed):
        assert rc == 0, (p, log[-3000:])
    assert "results:" in resumed[0][1] and "results:" not in resumed[1][1]  # reports from process 0 only
    assert "train:" not in resumed[1][1]  # no progress bar on process 1

    (single,), multi = _run_dirs(tmp_path, "single"), _run_dirs(tmp_path, "multi")
    assert len(multi) == 1, multi  # one directory for both processes and both launches
    multi = multi[0]
    assert (multi / ".complete").exists() and (multi / "checkpoints").is_dir()
    a, b = _params(single), _params(multi)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    la, lb = _losses(single), _losses(multi)
    assert max(lb) == 6 and lb.keys() == la.keys()
    np.testing.assert_allclose(lb[6], la[6], rtol=1e-5)


FAILING = textwrap.dedent("""
    import dataclasses, os, signal, sys, time
    import jax
    from jax.experimental import multihost_utils
    from jaxeff import experiment

    @dataclasses.dataclass(frozen=True)
    class Config:
        mode: str = "raise"

    @experiment.register("failing", Config, presets={"smoke": {}, "full": {}})
    def run(cfg, run):
        multihost_utils.sync_global_devices("started")
        if cfg.mode == "datastate":  # a checkpoint keeps one data state: differing ones are refused
            from jaxeff.distributed import replicate
            from jaxeff.train import Checkpointer
            state = replicate({"w": jax.numpy.ones(4)}, run.mesh)
            Checkpointer(run.dir.parent / "ckpt").save(1, state, {"next_index": jax.process_index()}, force=True)
        elif jax.process_index() == (1 if cfg.mode == "raise" else 0):
            if cfg.mode == "raise":
                raise RuntimeError("boom on purpose")
            os.kill(os.getpid(), signal.SIGKILL)
        for i in range(600):  # the survivor waits in collectives for a peer that never comes
            multihost_utils.sync_global_devices(f"step{i}")
            time.sleep(0.1)

    sys.exit(experiment.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("mode, survivor, messages", [
    # process 0 learns it from the coordination service, by its watcher or after gloo saw the peer go
    ("raise", 0, ["process 0 stops because process 1 of 2 failed: RuntimeError: boom on purpose"]),
    # the coordination service dies with process 0: jaxeff's message or JAX's own abort, whichever comes first
    ("sigkill", 1, ["process 0 has stopped", "JAX distributed service detected fatal errors"]),
    ("datastate", 0, ["process 0 stops because process 1 of 2 failed: ValueError: process 1's data state"]),
])
def test_failure_on_one_process_stops_the_other(tmp_path, mode, survivor, messages):
    t0 = time.time()
    out = _launch([sys.executable, "-c", FAILING, "name=failing", "preset=smoke", f"mode={mode}",
                   f"runs_root={tmp_path}"], tmp_path / "fail", processes=2, devices=1)
    assert time.time() - t0 < 60  # not the 100 s heartbeat timeout plus the 300 s shutdown barrier
    rc, log = out[survivor]
    assert rc != 0 and any(m in log for m in messages), log[-3000:]
    runs = [p.name for p in (tmp_path / "failing").iterdir() if p.name != "ckpt"]
    assert len(runs) == 1 and runs[0].endswith(".failed") == (mode != "sigkill"), runs  # one dir, marked failed


PRIMITIVES = textwrap.dedent("""
    import dataclasses, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxeff import experiment
    from jaxeff.distributed import replicate, shard_global_batch, to_host, to_local

    @dataclasses.dataclass(frozen=True)
    class Config:
        rows: int = 8

    @experiment.register("primitives", Config, presets={"smoke": {}, "full": {}})
    def run(cfg, run):
        x = np.arange(cfg.rows * 3, dtype=np.float32).reshape(cfg.rows, 3)  # the same global batch everywhere
        g = shard_global_batch({"x": x}, run.mesh)["x"]
        assert g.shape == x.shape and not g.is_fully_addressable and run.mesh.size == 4
        np.testing.assert_array_equal(to_host(g), x)  # gathered from both processes
        y = jax.jit(lambda w, g: g @ w)(replicate(jnp.arange(3.0), run.mesh), g)  # sharded over 2 processes
        np.testing.assert_array_equal(to_host(y), x @ np.arange(3.0))
        local = to_local({"w": replicate(jnp.ones(2), run.mesh), "key": replicate(jax.random.key(3), run.mesh)})
        assert local["w"].is_fully_addressable and jax.random.key_data(local["key"]).tolist() == [0, 3]
        six = run.data_mesh(6)  # 6 rows do not divide among 4 devices: one device of each process
        assert six.size == 2 and {d.process_index for d in six.devices.flat} == {0, 1}
        try:
            run.data_mesh(3)
            raise AssertionError("3 rows split over 2 processes")
        except ValueError as e:
            assert "cannot be split evenly over 2 processes" in str(e)
        run.savez("y.npz", y=to_host(y))
        run.results([{"sum": float(to_host(y).sum())}])

    sys.exit(experiment.main(sys.argv[1:]))
""")


def test_global_array_helpers_on_a_simulated_srun_step(tmp_path):
    """shard_global_batch / to_host / to_local / Run.data_mesh / Run.savez on 2 processes x 2 devices, started as
    the two tasks of an srun step on 127.0.0.1 and set up by JAX's Slurm detection (the other tests use JAX_*)."""
    out = _launch([sys.executable, "-c", PRIMITIVES, "name=primitives", "preset=smoke", f"runs_root={tmp_path}"],
                  tmp_path / "prim", processes=2, devices=2, launcher="slurm")
    for p, (rc, log) in enumerate(out):
        assert rc == 0, (p, log[-3000:])
    assert "data parallel over 2 of them" in out[0][1] and "data parallel" not in out[1][1]  # process 0 reports
    (run_dir,) = (tmp_path / "primitives").iterdir()
    np.testing.assert_array_equal(np.load(run_dir / "y.npz")["y"], np.arange(24.0).reshape(8, 3) @ np.arange(3.0))
    assert (run_dir / "results.md").read_text().count("| sum |") == 1


def test_pipeline_rows_make_the_global_batch():
    make = lambda idx: {"idx": idx}
    whole = list(index_batches(make, 6, 4))
    halves = [list(index_batches(make, 6, 4, rows=r)) for r in ((0, 3), (3, 6))]
    for i, batch in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([h[i]["idx"] for h in halves]), batch["idx"])
        np.testing.assert_array_equal(batch["idx"], np.arange(6 * i, 6 * i + 6))
    with pytest.raises(ValueError, match="rows"):
        index_batches(make, 6, 4, rows=(4, 8))


def test_slurm_devices_per_process():
    from jaxeff.distributed import slurm_local_device_ids

    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    assert slurm_local_device_ids(slurm) is None  # one process per GPU: JAX's own choice (GPU SLURM_LOCALID)
    assert slurm_local_device_ids(slurm | {"SLURM_NTASKS": "2"}) == list(range(8))  # one process per node
    # srun's step variables win over the allocation's (an 8-task step inside a 16-task job on 2 nodes)
    assert slurm_local_device_ids(slurm | {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2"}) == [*range(8)]
    assert slurm_local_device_ids(slurm | {"SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "2"}) is None
    # one process per node without SLURM_GPUS_ON_NODE: the GPUs it sees
    one_per_node = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NNODES": "2"}
    assert slurm_local_device_ids(one_per_node | {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == [0, 1, 2, 3]
    assert slurm_local_device_ids(one_per_node) is None
    # --gpus-per-task=1: Slurm shows each task one GPU, which it sees as GPU 0 whatever its SLURM_LOCALID
    assert slurm_local_device_ids(slurm | {"SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "5"}) == [0]
    assert slurm_local_device_ids({"SLURM_NTASKS": "2", "SLURM_NNODES": "2"}) is None  # not Slurm


def test_slurm_without_srun_is_a_clear_error(monkeypatch):
    from jaxeff import distributed

    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
            "SLURM_LOCALID": "0"}
    assert distributed.slurm_step_missing(step) == [] and distributed.cluster_detected(step)
    batch_script = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}  # python started by sbatch itself, no srun
    assert distributed.slurm_step_missing(batch_script) == ["SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"]
    assert not distributed.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})  # one task: no cluster
    for key in [k for k in os.environ if k.startswith(("SLURM_", "JAX_COORDINATOR", "OMPI_", "TPU_WORKER"))]:
        monkeypatch.delenv(key)
    for key, value in batch_script.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match="start the command with srun"):
        distributed.maybe_initialize()
    assert not distributed.is_initialized()


def test_process_rows_single_process():
    import jax

    from jaxeff.distributed import make_mesh, process_rows

    mesh = make_mesh(devices=jax.devices()[:1])
    assert process_rows(mesh, 8) == (0, 8)
