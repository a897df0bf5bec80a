"""2D-attention steps on a (ring, ulysses) mesh, for measuring them: the pieces `experiments/longvila_mmsp.py` and
`benchmarks/longvila.py` share.

- `factorisations(n)`: every split (ring R, Ulysses U) with R * U = n, pure ring (n, 1) first.
- `sp_mesh(ring, ulysses)`: a mesh with axes `AXES` = ("ring", "ulysses"), Ulysses the minor (fast) axis, so a
  Ulysses group is neighbouring devices (inside a host; `jaxeff.distributed.make_mesh`).
- `attention_step(mesh, positions, backward)`: the jitted global-array 2D attention
  (`attention.sequence_parallel_attention`, causal), forward (the output) or forward+backward (the gradients of
  sum(output) with respect to q, k, v).
- `random_qkv(mesh, ...)`: normal q, k, v made on the devices, sequence-sharded as the step expects.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff.distributed import make_mesh
from jaxeff.longvila.attention import sequence_parallel_attention

AXES = ("ring", "ulysses")


def factorisations(n: int) -> list[tuple[int, int]]:
    """[(ring, ulysses)] with ring * ulysses = n, by increasing Ulysses degree."""
    return [(n // u, u) for u in range(1, n + 1) if n % u == 0]


def sp_mesh(ring: int, ulysses: int, devices=None):
    """A (ring, ulysses) mesh with Auto axes over `devices` (default all) in topology-aware order."""
    return make_mesh((ring, ulysses), AXES, devices=devices)


def attention_fn(mesh, positions=None, num_sub_blocks: int = 2):
    """`(q, k, v) -> out`: causal 2D attention over `mesh`'s `AXES`; `positions` and `num_sub_blocks` as in
    `sequence_parallel_attention` (the global positions of the tokens in the given order; query / key blocks per
    ring block)."""
    return functools.partial(sequence_parallel_attention, mesh=mesh, ring_axis=AXES[0], ulysses_axis=AXES[1],
                             positions=positions, num_sub_blocks=num_sub_blocks)


def attention_step(mesh, positions=None, backward: bool = False, num_sub_blocks: int = 2):
    """Jitted `(q, k, v) -> out` (forward) or `-> (dq, dk, dv)` of sum(out) in float32 (forward+backward)."""
    attn = attention_fn(mesh, positions, num_sub_blocks)
    if not backward:
        return jax.jit(attn)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))


def random_qkv(mesh, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
               seed: int = 0):
    """q [B, S, H, D], k, v [B, S, H_kv, D], standard normal in `dtype`, generated sharded over the sequence axis
    (`P(None, AXES)`) so no device holds the whole arrays."""
    seq_sharding = NamedSharding(mesh, P(None, AXES))
    make = jax.jit(lambda key: tuple(jax.random.normal(k, (batch, seq, h, head_dim), dtype)
                                     for k, h in zip(jax.random.split(key, 3), (heads, kv_heads, kv_heads))),
                   out_shardings=(seq_sharding,) * 3)
    return make(jax.random.key(seed))
