"""Filling an NNX module from a torch-named state dict: the one loop behind the SigLIP tower and projector loaders
(shapes checked, every problem named)."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

# our parameter path -> (checkpoint key, checkpoint array -> our layout, or None = as stored)
KeyFn = Callable[[tuple], tuple[str, Callable[[np.ndarray], np.ndarray] | None]]


def load_mapped(module: nnx.Module, tensors: dict[str, np.ndarray], key_of: KeyFn, *, source: str, what: str,
                ignore: tuple[str, ...] = ()) -> nnx.Module:
    """Fill `module`'s `nnx.Param`s in place (cast to their dtypes) from `tensors`; raises ValueError naming every
    missing, unexpected or mis-shaped key ("<source> does not fit <what>: ..."). Checkpoint keys starting with one
    of `ignore` may be left unused."""
    state = nnx.state(module, nnx.Param)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    new, problems, used = {}, [], set()
    for path, current in flat.items():
        key, transform = key_of(path)
        if key not in tensors:
            problems.append(f"missing {key}")
            continue
        arr = np.asarray(tensors[key])
        arr = transform(arr) if transform else arr
        if arr.shape != tuple(current.shape):
            problems.append(f"{key}: checkpoint {arr.shape} vs model {tuple(current.shape)}")
            continue
        new[path] = jnp.asarray(arr, current.dtype)
        used.add(key)
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - used) if not k.startswith(ignore)]
    if problems:
        raise ValueError(f"{source} does not fit {what}: " + "; ".join(problems))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new))
    nnx.update(module, state)
    return module
