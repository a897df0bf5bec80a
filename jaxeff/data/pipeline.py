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
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """A grain MapDataset of `num_batches` batches; batch i is `make_batch(example indices of batch i)`.

    Each process reads the batches i with i % process_count == process_index (grain slicing), so a data-parallel
    job sees disjoint data; the iterator state (`get_state`/`set_state`) is checkpointable."""
    import grain

    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.range(num_batches)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[process_index::process_count]
    return ds.map(lambda i: make_batch(np.arange(i * batch_size, (i + 1) * batch_size)))
