"""Orbax checkpoints of a TrainState plus the data-pipeline position (one module, so an Orbax API move is cheap)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves `TrainState` + a JSON-able data state every `interval` steps; restores the latest.

    Multi-process: every process calls `save` / `restore` with the same global `jax.Array`s (Orbax writes each
    array once, coordinated over `jax.distributed`) into one `directory` on a filesystem all hosts see. The data
    state is written once, from process 0, so it must be the same on every process (it is for
    `jaxeff.data.index_batches`, whose state is the global step); `save` checks that and raises otherwise."""

    def __init__(self, directory: str | Path, *, interval: int = 100, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=interval, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        data_state = data_state or {}
        if jax.process_count() > 1 and (force or self.manager.should_save(step)):
            _check_same_on_every_process(data_state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, dict(restored.data or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_same_on_every_process(data_state: dict) -> None:
    from jaxeff.distributed import broadcast_str

    mine = json.dumps(data_state, sort_keys=True)
    main = broadcast_str(mine, max_bytes=1 << 16)  # the same buffer size on every process
    if main != mine:
        raise ValueError(f"process {jax.process_index()}'s data state {mine} differs from process 0's {main}: a "
                         "checkpoint keeps one data state, so resuming would feed this process other batches")
