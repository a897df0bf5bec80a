"""grain pipelines over index-addressed example generators, sharded by process."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported when used, so the models and kernels work where grain is not installed
    import grain


def index_batches(
    make_batch: Callable[[np.ndarray], dict[str, np.ndarray]],
    batch_size: int,
    num_batches: int,
    *,
    seed: int = 0,
    shuffle: bool = False,
    rows: tuple[int, int] | None = None,
) -> grain.MapDataset:
    """A grain MapDataset of `num_batches` global batches of `batch_size` examples; element i is this process's
    share of global batch i: `make_batch(example indices i * batch_size + [start, stop))` for `rows=(start, stop)`
    (default: the whole batch; under data parallelism `jaxeff.distributed.process_rows(mesh, batch_size)`).

    Every process walks the same global batches in the same order and reads only its own rows, so the global
    batch that `jaxeff.distributed.shard_batch` assembles is the single-process one whatever the process count,
    and the iterator state (`get_state`/`set_state`, the global step) is the same on every process."""
    import grain

    start, stop = (0, batch_size) if rows is None else rows
    if not 0 <= start < stop <= batch_size:
        raise ValueError(f"rows {rows} do not lie in a batch of {batch_size}")
    ds = grain.MapDataset.range(num_batches)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.map(lambda i: make_batch(np.arange(i * batch_size + start, i * batch_size + stop)))
