"""Tensor parallelism (Megatron-style) for the shared decoders (`Llama` for Llama / Mistral / Qwen2, `Gemma2`) and
their KV caches, by placing arrays with `NamedSharding`s and letting XLA's GSPMD partition the unchanged model
code under `jax.jit` (Shoeybi et al. 2019, "Megatron-LM", section 3: column-parallel then row-parallel linears).

Layout over one mesh axis of size n (`axis`, default "model"); every other mesh axis holds replicas:
- q_proj / gate_proj / up_proj kernels [in, out] split by columns (whole heads: `num_attention_heads % n == 0`;
  ffn: `intermediate_size % n == 0`), their biases alike; o_proj / down_proj kernels split by rows, so each
  device computes its heads and its slice of the MLP and GSPMD adds the partial outputs (one all-reduce each);
- k_proj / v_proj and the KV cache split by KV heads when `num_key_value_heads % n == 0`, otherwise REPLICATED
  when `n % num_key_value_heads == 0` (fewer KV heads than devices, e.g. Llama-3-8B's 8 on 16 devices: each
  device then holds every KV head and attends its query heads to theirs); anything else raises ValueError;
- embed_tokens [vocab, hidden] and lm_head [hidden, vocab] split over the vocabulary when `vocab % n == 0`
  (GSPMD turns the embedding gather into a masked lookup plus all-reduce and gives logits sharded over the
  vocabulary), otherwise replicated; norms replicated.

Caches (`shard_cache`): `ContiguousKVCache` k/v [B, T, Hkv, D] like k_proj (heads or replicated); any other cache
declares its layout with a `partition_specs(n, axis)` method built from `heads_spec` (DuoAttention's
`DualKVCache`: full caches by heads, else over the sequence, else replicated; streaming rings replicated. LServe's
`LServeCache`: each page pool by KV heads, else replicated; page tables and lengths replicated).

Attention under GSPMD: the front door's "xla" and "dot_product" implementations (jax's `dot_product_attention`
without an implementation is XLA on every backend) are plain XLA ops, so they partition as above; jax gives its
cuDNN attention (reached through "pallas" on a GPU) a partitioning rule (untested here). The
contiguous and DuoAttention caches turn implementation "pallas" into the default, so their generation never runs
a Pallas kernel. A Pallas call on sharded arrays (a cache-free forward with `implementation="pallas"`, LServe's
kernels) is a custom call GSPMD cannot split: XLA gathers its inputs and runs it whole on every device (correct,
but neither memory nor work is split; jax-ml/jax-triton#163); on CPU the interpreted kernel is plain XLA and
splits. `shard_heads` runs a function per device under `jax.shard_map` over the head shards instead:
`attention_fn(mesh)` (the front door in cache-free forwards) and LServe's cache (its paged decode kernels on pools
split by heads, and a prefill whose streaming flags are the same on every device) use it.

`per_device_nbytes` counts what one device holds of a tree of sharded arrays or sharded `jax.ShapeDtypeStruct`s
(`abstract_model`, `abstract_cache` on a `jax.sharding.AbstractMesh`), so memory is planned for a model that is
never built.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # kernel [in, out]: split `out`
_ROW = ("o_proj", "down_proj")  # kernel [in, out]: split `in`; bias [out] replicated
_KV = ("k_proj", "v_proj")


def _axis_size(mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, not {axis!r}")
    return mesh.shape[axis]


def plan(cfg, n: int) -> dict[str, bool]:
    """Which parts are split over n devices: {"kv_heads": bool, "vocab": bool} for a decoder config (`LlamaConfig`
    or `Gemma2Config`). ValueError when the query heads or the MLP width do not divide among n devices, or the KV
    heads neither divide among them nor divide n (so they cannot be replicated per device group either)."""
    hq, hkv, ffn = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if n < 1:
        raise ValueError(f"mesh axis size must be >= 1, got {n}")
    if hq % n:
        raise ValueError(f"cannot shard {hq} attention heads over {n} devices: num_attention_heads must be a "
                         f"multiple of the mesh axis size")
    if ffn % n:
        raise ValueError(f"cannot shard intermediate_size {ffn} over {n} devices: it must be a multiple of the "
                         "mesh axis size")
    if hkv % n and n % hkv:
        raise ValueError(f"cannot shard {hkv} key/value heads over {n} devices: num_key_value_heads must be a "
                         f"multiple of the mesh axis size (split) or divide it (replicated)")
    return {"kv_heads": hkv % n == 0, "vocab": cfg.vocab_size % n == 0}


def _param_spec(path: tuple, ndim: int, parts: dict[str, bool], axis: str) -> PartitionSpec:
    module, leaf = str(path[-2]), str(path[-1])
    split = not (module in _KV and not parts["kv_heads"])
    if module in _COLUMN and leaf in ("kernel", "bias"):
        if not split:
            return PartitionSpec()
        return PartitionSpec(None, axis) if leaf == "kernel" else PartitionSpec(axis)
    if module in _ROW and leaf in ("kernel", "bias"):
        return PartitionSpec(axis, None) if leaf == "kernel" else PartitionSpec()
    if module == "embed_tokens" and leaf == "embedding":
        return PartitionSpec(axis, None) if parts["vocab"] else PartitionSpec()
    if module == "lm_head" and leaf == "kernel":
        return PartitionSpec(None, axis) if parts["vocab"] else PartitionSpec()
    if leaf == "weight" and ndim == 1 and "norm" in module:
        return PartitionSpec()
    raise ValueError(f"no tensor-parallel rule for parameter {'.'.join(map(str, path))} (ndim {ndim})")


def param_specs(model: nnx.Module, n: int, axis: str = "model") -> dict:
    """{path tuple: PartitionSpec} for every `nnx.Param` of a Llama / Gemma2 model (paths as in
    `nnx.to_pure_dict`, e.g. ("layers", 0, "self_attn", "q_proj", "kernel")). ValueError as in `plan`, or for a
    parameter with no rule."""
    parts = plan(model.config, n)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {path: _param_spec(path, len(x.shape), parts, axis) for path, x in flat.items()}


def shard_model(model: nnx.Module, mesh, axis: str = "model") -> nnx.Module:
    """Place `model`'s parameters on `mesh` split over `axis` (module docstring), in place; returns `model`.

    `model` may live anywhere (e.g. loaded on the host CPU with `jax.default_device` when it fits no single
    accelerator); each parameter is copied straight into its shards. Afterwards `jaxeff.models.llama.generate`,
    `jaxeff.duo_attention.generate` and `model(...)` under `jax.jit` run partitioned by GSPMD and give the
    one-device result up to float summation order (row-parallel partial sums). A mesh axis of size 1 is a valid
    no-op layout (one code path for one device and many). ValueError as in `param_specs`."""
    _axis_size(mesh, axis)
    specs = param_specs(model, mesh.shape[axis], axis)
    state = nnx.state(model, nnx.Param)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    placed = {path: jax.device_put(x, NamedSharding(mesh, specs[path])) for path, x in flat.items()}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(placed))
    nnx.update(model, state)
    return model


def model_mesh(model: nnx.Module) -> tuple[Any, str] | None:
    """(mesh, axis) of a model placed by `shard_model` (read from its first q_proj kernel), or None when the model
    is not on a mesh."""
    kernel = model.layers[0].self_attn.q_proj.kernel[...]
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, NamedSharding) or len(sharding.spec) < 2 or sharding.spec[1] is None:
        return None
    return sharding.mesh, sharding.spec[1]


def heads_spec(heads: int, length: int, n: int, axis: str, by_sequence: bool, *, head_dim: int = 2,
               sequence_dim: int = 1) -> PartitionSpec:
    """The spec of a 4-d cache array over n devices, heads at `head_dim` and the sequence at `sequence_dim`
    (default [B, T, heads, D]; LServe's page pools [heads, pages, page_size, D] pass head_dim=0): split by heads
    when they divide evenly, else (with `by_sequence`) over the sequence when it does, else replicated."""
    def split(dim):
        return PartitionSpec(*(axis if i == dim else None for i in range(4)))

    if heads % n == 0:
        return split(head_dim)
    if by_sequence and length % n == 0:
        return split(sequence_dim)
    return PartitionSpec()


def cache_specs(cache, n: int, axis: str = "model"):
    """A pytree of PartitionSpecs matching `cache` (module docstring): a `jaxeff.nn.ContiguousKVCache`, or any
    cache that declares its own layout with a `partition_specs(n, axis)` method (DuoAttention's `DualKVCache`,
    built from `heads_spec`). TypeError for another cache type."""
    from jaxeff.nn import ContiguousKVCache

    if isinstance(cache, ContiguousKVCache):
        specs = tuple(heads_spec(x.shape[2], x.shape[1], n, axis, by_sequence=False) for x in cache.k)
        return cache.replace(k=specs, v=specs)
    if hasattr(cache, "partition_specs"):
        return cache.partition_specs(n, axis)
    raise TypeError(f"no tensor-parallel layout for a {type(cache).__name__}")


def shard_cache(cache, mesh, axis: str = "model"):
    """`cache` placed on `mesh` as `cache_specs` says (device_put of every array)."""
    specs = cache_specs(cache, _axis_size(mesh, axis), axis)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), cache, specs)


def init_cache(make_cache, model: nnx.Module):
    """`make_cache()` (e.g. `lambda: model.init_cache(batch, length)`), built straight into its `cache_specs`
    shards when `model` was placed by `shard_model` (one jitted program with those output shardings, so no
    device ever holds the whole cache), else called as is. What a generate loop calls to build its cache."""
    where = model_mesh(model)
    if where is None:
        return make_cache()
    mesh, axis = where
    specs = cache_specs(jax.eval_shape(make_cache), mesh.shape[axis], axis)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.jit(make_cache, out_shardings=shardings)()


def shard_heads(fn, mesh, axis: str = "model"):
    """`fn(q, k, v, *rest) -> out` run per device under `jax.shard_map` over the attention heads: q [B, S, Hq, D]
    split over its heads, k, v [B, S', Hkv, D] split alike, or, when there are fewer KV heads than devices
    (n % Hkv == 0), replicated and cut to the one KV head of this device's query heads; `rest` replicated; the
    output [B, S, Hq, D] split like q. A Pallas kernel inside `fn` then runs on each device's heads instead of as
    one custom call that GSPMD cannot split. Returns the wrapped function; it raises ValueError for head counts
    that neither split over nor divide the mesh axis."""
    n = _axis_size(mesh, axis)
    heads, rep = PartitionSpec(None, None, axis, None), PartitionSpec()

    def run(q, k, v, *rest):
        if q.shape[2] % n:
            raise ValueError(f"{q.shape[2]} query heads do not split over {n} devices")
        kv_split = k.shape[2] % n == 0
        if not kv_split and n % k.shape[2]:
            raise ValueError(f"{k.shape[2]} key/value heads neither split over nor divide {n} devices")

        def local(q, k, v, *rest):
            if not kv_split:  # n % Hkv == 0: this device's query heads all belong to KV head d * Hkv // n
                head = jax.lax.axis_index(axis) * k.shape[2] // n
                k = jax.lax.dynamic_slice_in_dim(k, head, 1, axis=2)
                v = jax.lax.dynamic_slice_in_dim(v, head, 1, axis=2)
            return fn(q, k, v, *rest)

        kv = heads if kv_split else rep
        return jax.shard_map(local, mesh=mesh, in_specs=(heads, kv, kv) + (rep,) * len(rest), out_specs=heads,
                             check_vma=False)(q, k, v, *rest)

    return run


def attention_fn(mesh, axis: str = "model", implementation: str | None = None):
    """An `attention_fn` for `Llama.__call__` (cache-free forwards) that runs the attention front door on each
    device's own heads (`shard_heads`), so `implementation="pallas"` runs per shard instead of as one custom call
    GSPMD cannot split. With "pallas" the positions must be the default `arange` ones (the front door's Pallas
    path takes none); layer windows are refused by the model (see `Llama.__call__`)."""
    from jaxeff.nn import attention

    def local(q, k, v, qp, kp):
        if implementation == "pallas":  # the kernel takes no positions: the default (arange) ones
            return attention(q, k, v, causal=True, implementation="pallas")
        return attention(q, k, v, q_positions=qp, kv_positions=kp, causal=True, implementation=implementation)

    run = shard_heads(local, mesh, axis)

    def fn(layer, q, k, v, *, q_positions, kv_positions):
        del layer
        return run(q, k, v, q_positions, kv_positions)

    return fn


def abstract_model(cfg, mesh, axis: str = "model", dtype=None) -> dict:
    """The parameters of the decoder of `cfg` (`LlamaConfig` / `Gemma2Config`, default bfloat16) as
    `jax.ShapeDtypeStruct`s carrying their shardings on `mesh` (a `jax.sharding.AbstractMesh` will do), without
    allocating anything: {path: ShapeDtypeStruct}, for `per_device_nbytes`."""
    import jax.numpy as jnp

    from jaxeff.io.hf import decoder_class

    dtype = jnp.bfloat16 if dtype is None else dtype
    model = nnx.eval_shape(lambda: decoder_class(cfg)(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    specs = param_specs(model, _axis_size(mesh, axis), axis)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {path: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, specs[path]))
            for path, x in flat.items()}


def abstract_cache(make_cache, mesh, axis: str = "model"):
    """`jax.eval_shape(make_cache)` (e.g. `lambda: DualKVCache.init(...)`) with every leaf carrying the
    `cache_specs` sharding on `mesh` (an AbstractMesh will do); nothing is allocated."""
    shapes = jax.eval_shape(make_cache)
    specs = cache_specs(shapes, _axis_size(mesh, axis), axis)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                        shapes, specs)


def per_device_nbytes(tree) -> int:
    """Bytes of one device's shard (`sharding.shard_shape`) summed over a pytree of `jax.Array`s or sharded
    `jax.ShapeDtypeStruct`s (shards are equal: `shard_model` / `shard_cache` only split evenly)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))
