"""Filling an NNX module from an official (PyTorch-named) state dict: the one loop behind every system's loader.

The caller gives a key mapping: our variable path -> (checkpoint key, checkpoint array -> our layout). The loop
checks every shape and raises one `CheckpointMismatchError` naming all missing, unexpected and mis-shaped keys, so a
wrong config or checkpoint is never loaded half-way. `from_torch` / `to_torch` are the usual layout transposes
(torch conv [O, I, kh, kw] <-> our [kh, kw, I, O], linear [out, in] <-> [in, out]) and `torch_key` the usual naming
(our `kernel` / `scale` / `embedding` leaves are torch's `weight`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

# our variable path -> (checkpoint key, checkpoint array -> our layout, or None = as stored)
KeyFn = Callable[[tuple], tuple[str, Callable[[np.ndarray], np.ndarray] | None]]

TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_SHOWN = 20  # names listed per kind of problem


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the module; the message names the offending keys."""


def torch_key(path: tuple) -> str:
    """Our variable path -> the dotted torch name (`encoder.conv_in.kernel` -> `encoder.conv_in.weight`)."""
    *mods, leaf = (str(p) for p in path)
    return ".".join(mods + [TORCH_LEAF.get(leaf, leaf)])


def _kernel_layout(arr: np.ndarray, leaf: str, conv_axes: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(conv_axes)
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def from_torch(arr: np.ndarray, leaf: str) -> np.ndarray:
    """A torch tensor in our layout: `kernel` leaves transposed (conv OIHW -> HWIO, linear [out, in] -> [in, out])."""
    return _kernel_layout(arr, leaf, (2, 3, 1, 0))


def to_torch(arr: np.ndarray, leaf: str) -> np.ndarray:
    """Inverse of `from_torch`."""
    return _kernel_layout(arr, leaf, (3, 2, 0, 1))


def torch_layout(path: tuple) -> Callable[[np.ndarray], np.ndarray]:
    """The `from_torch` transform for the leaf of `path` (the second half of a `KeyFn` result)."""
    leaf = str(path[-1])
    return lambda arr: from_torch(arr, leaf)


def _names(items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{items[:_SHOWN]}{more}"


def load_mapped(module: nnx.Module, tensors: dict[str, np.ndarray], key_of: KeyFn, *, source: str, what: str,
                ignore: Callable[[str], bool] | None = None, dtype=None, variables=nnx.Param) -> nnx.Module:
    """Fill `module`'s `variables` (default the `nnx.Param`s) from `tensors` in place and return it; `module` may be
    abstract (`nnx.eval_shape`): its other state (dropout RNG keys, counters) is made concrete (distinct keys, zero
    counters). Arrays are cast to `dtype` (default: each variable's own dtype).

    Raises CheckpointMismatchError("<source> does not fit <what>: missing keys: [...]; unexpected keys: [...];
    shape mismatches: [...]"); checkpoint keys for which `ignore(key)` is true may be left unused."""
    state, rest = nnx.state(module, variables, ...)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    used, missing, mismatched, new = set(), [], [], {}
    for path, cur in flat.items():
        key, transform = key_of(path)
        if key not in tensors:
            missing.append(key)
            continue
        used.add(key)  # a mis-shaped key is reported as such, not also as unexpected
        raw = np.asarray(tensors[key])
        arr = transform(raw) if transform else raw
        if arr.shape != tuple(cur.shape):
            ours = f" = {arr.shape} in our layout" if arr.shape != raw.shape else ""
            mismatched.append(f"{key}: checkpoint {raw.shape}{ours} vs model {tuple(cur.shape)}")
            continue
        new[path] = jnp.asarray(arr, cur.dtype if dtype is None else dtype)
    unexpected = sorted(k for k in tensors if k not in used and not (ignore and ignore(k)))
    problems = [f"{name}: {_names(vals)}" for name, vals in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if vals]
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit {what}: " + "; ".join(problems))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new))
    nnx.update(module, state, _concrete(rest))
    return module


def _concrete(state, seed: int = 0):
    """Non-loaded state left abstract by `nnx.eval_shape` (dropout RNG keys and counters) made concrete: distinct
    keys from `seed`, zero counters."""
    leaves, treedef = jax.tree.flatten(state)
    out = []
    for i, x in enumerate(leaves):
        if isinstance(x, jax.ShapeDtypeStruct):
            is_key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
            x = jax.random.fold_in(jax.random.key(seed), i) if is_key else jnp.zeros(x.shape, x.dtype)
        out.append(x)
    return jax.tree.unflatten(treedef, out)
