"""Running an experiment body on N simulated CPU devices.

XLA reads `--xla_force_host_platform_device_count` only when its CPU backend starts, so a process that already
initialised jax with fewer devices cannot get more. `run_on_devices` therefore runs the experiment body in the
current process when enough devices exist (GPU/TPU hosts, or a process started with the flag, as the tests are)
and otherwise re-launches it in a child Python process with `XLA_FLAGS=--xla_force_host_platform_device_count=N`
and `JAX_PLATFORMS=cpu` (`run_child`, also used by `benchmarks/longvila.py`), writing into the same run directory
(config rebuilt from its `config.json`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path


def needs_reexec(num_devices: int) -> bool:
    import jax

    return jax.default_backend() == "cpu" and jax.device_count() < num_devices


def run_on_devices(body, cfg, run, num_devices: int = 8) -> None:
    """Call `body(cfg, run)` with at least `num_devices` devices (see the module docstring)."""
    if not needs_reexec(num_devices):
        body(cfg, run)
        return
    print(f"[{run.name}] only {_device_count()} CPU device(s) here: re-running in a child process with "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}", flush=True)
    run_child(["-m", "jaxeff.longvila.devices", body.__module__, body.__name__, run.name, run.preset, str(run.dir)],
              num_devices)


def run_child(args: list[str], num_devices: int) -> None:
    """Run `python <args>` (this interpreter) on `num_devices` simulated CPU devices and wait for it.

    Raises RuntimeError when this process already runs with that XLA flag (the child would be short of devices
    too, and re-launch itself forever), subprocess.CalledProcessError when the child fails."""
    flag = f"--xla_force_host_platform_device_count={num_devices}"
    flags = os.environ.get("XLA_FLAGS", "")
    if flag in flags.split():
        raise RuntimeError(f"XLA_FLAGS already has {flag}, yet jax sees {_device_count()} device(s) "
                           f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r})")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} {flag}".strip())
    subprocess.run([sys.executable, *args], env=env, check=True)


def _device_count() -> int:
    import jax

    return jax.device_count()


def _child(module: str, fn_name: str, name: str, preset: str, directory: str) -> None:
    from jaxeff.experiment import Run, get

    mod = importlib.import_module(module)
    saved = json.loads((Path(directory) / "config.json").read_text())["config"]
    config_cls = mod.Config
    kwargs = {f.name: tuple(saved[f.name]) if isinstance(saved[f.name], list) else saved[f.name]
              for f in dataclasses.fields(config_cls) if f.name in saved}
    cfg = config_cls(**kwargs)
    run = Run(name, preset, cfg, Path(directory), description=get(name).description)
    getattr(mod, fn_name)(cfg, run)
    run.finish()  # the wall time in results.md (the parent's Run holds no results)


if __name__ == "__main__":
    _child(*sys.argv[1:6])
