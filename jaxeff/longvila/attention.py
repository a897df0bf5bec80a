"""2D sequence-parallel attention (Ulysses all-to-all x ring attention) for `jax.shard_map`.

The sequence axis of q/k/v is sharded over the device pair (ring_axis, ulysses_axis), ring-major: the device at
(ring r, ulysses u) holds slot `r * U + u` of the sequence. Inside one layer:

1. Ulysses: an all-to-all over `ulysses_axis` gathers the U slots of a ring rank and scatters the heads, so each
   device holds the whole ring block (S/R tokens) for H/U heads.
2. Ring: K/V and their global positions go round `ring_axis` with `ppermute` (R - 1 hops) while each device folds
   every visiting block into an online softmax (f32 running max / sum). Causal masking compares the global
   positions that travel with K/V, so any token order (contiguous, zigzag, packed) gives the exact result.
   Negative positions are empty slots: their K/V are zeroed and never attended to, and their rows (and any row
   that sees no key) come back as zeros, as in `jaxeff.nn.attention`.
   Sub-blocks whose keys are all in the future of all queries are skipped with `lax.cond`; with the zigzag layout
   (`jaxeff.longvila.layout`) every ring rank then does the same causal work.
3. The inverse all-to-all restores the sequence-sharded layout.

GQA: when the KV heads do not split over the Ulysses degree they are repeated (the smallest repeat that makes
them divisible); autodiff of the repeat sums the copies' gradients back. Differentiable by plain autodiff (the
transpose of `ppermute` is the reverse `ppermute`); each block's scores are recomputed in the backward pass
(`jax.checkpoint`), so activation memory is linear in S per device. Run on CPU (8 host-platform devices) only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxeff.nn.attention import zero_empty_slots

# Finite mask value: -inf would make exp(-inf - -inf) = nan and poison gradients through `where`.
_NEG = -1e30


def kv_repeat_factor(num_heads: int, num_kv_heads: int, ulysses: int) -> int:
    """Smallest KV-head repeat so that the (repeated) KV heads split evenly over the Ulysses degree."""
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if num_heads % ulysses:
        raise ValueError(f"query heads ({num_heads}) must be divisible by the Ulysses degree ({ulysses})")
    return ulysses // math.gcd(num_kv_heads, ulysses)


def mesh_degrees(mesh: Mesh, ring_axis: str, ulysses_axis: str) -> tuple[int, int]:
    """(ring degree R, Ulysses degree U): the sizes of the two named axes of `mesh`.

    Raises ValueError naming the axis and the mesh's axes when the mesh has no axis of that name, or when both
    names are the same axis (the sequence would be sharded over it twice).
    """
    for role, axis in (("ring_axis", ring_axis), ("ulysses_axis", ulysses_axis)):
        if axis not in mesh.shape:
            raise ValueError(f"{role}={axis!r} is not an axis of the mesh; its axes are {tuple(mesh.axis_names)}")
    if ring_axis == ulysses_axis:
        raise ValueError(f"ring_axis and ulysses_axis must be two different mesh axes, both are {ring_axis!r}")
    return mesh.shape[ring_axis], mesh.shape[ulysses_axis]


def _as_batch_positions(positions, batch: int, seq: int, name: str = "positions") -> jax.Array:
    if positions is None:
        positions = jnp.arange(seq, dtype=jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape == (seq,):
        positions = jnp.broadcast_to(positions[None], (batch, seq))
    if positions.shape != (batch, seq):
        raise ValueError(f"{name} must be [S] or [B, S] = {(batch, seq)}, got {positions.shape}")
    return positions


def _visible(q_meta, kv_meta, causal: bool):
    """[B, Lq, Lk] mask from token metadata (positions,) or (positions, segment ids), each [B, L]. Negative K/V
    positions are empty slots (the `jaxeff.nn.attention` convention); with segment ids, only equal ids meet."""
    q_pos, kv_pos = q_meta[0], kv_meta[0]
    visible = kv_pos[:, None, :] >= 0
    if causal:
        visible &= kv_pos[:, None, :] <= q_pos[:, :, None]
    if len(q_meta) > 1:
        visible &= q_meta[1][:, :, None] == kv_meta[1][:, None, :]
    return visible


def _fold_block(state, q, k, v, q_meta, kv_meta, causal: bool, scale: float):
    """Fold one K/V block into the online-softmax state of one query block.

    q [B, Lq, Hkv, G, D]; k, v [B, Lk, Hkv, D]; q_meta / kv_meta: tuples of [B, L] int (positions[, segment ids]);
    state = (o [B, Lq, Hkv, G, D], m, l [B, Hkv, G, Lq]) in f32.
    """
    o, m, denom = state
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    visible = _visible(q_meta, kv_meta, causal)[:, None, None]  # [B, 1, 1, Lq, Lk]
    s = jnp.where(visible, s, _NEG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    denom_new = alpha * denom + p.sum(-1)
    pv = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o_new = jnp.moveaxis(alpha, -1, 1)[..., None] * o + pv
    return o_new, m_new, denom_new


# Rematerialise each block's scores in the backward pass: autodiff of the ring would otherwise keep a
# [Lq, Lk] probability matrix per step (activation memory quadratic in S/R per device); with this, the backward
# keeps only each step's inputs (K/V block and running state), linear in S.
_fold_block_remat = jax.checkpoint(_fold_block, static_argnums=(6, 7))


def _split_meta(meta, num_sub):
    """(positions[, segment ids]) [B, L] each -> num_sub tuples of [B, L / num_sub] pieces."""
    return list(zip(*(jnp.split(x, num_sub, axis=1) for x in meta)))


def _fold_blocks_skipping(states, q_subs, k, v, q_meta_subs, kv_meta, causal, scale, num_sub):
    """Fold K/V into each query sub-block, skipping (sub-block, sub-block) pairs that are entirely masked."""
    k_subs = jnp.split(k, num_sub, axis=1)
    v_subs = jnp.split(v, num_sub, axis=1)
    kp_subs = _split_meta(kv_meta, num_sub)
    new_states = []
    for state, qs, qp in zip(states, q_subs, q_meta_subs):
        for ks, vs, kp in zip(k_subs, v_subs, kp_subs):
            if causal:
                # Conservative test (positions only, min over the block): a sub-block is skipped only if no key
                # can be visible.
                state = lax.cond(
                    jnp.max(qp[0]) >= jnp.min(kp[0]),
                    lambda st, qs=qs, ks=ks, vs=vs, qp=qp, kp=kp: _fold_block_remat(st, qs, ks, vs, qp, kp, True,
                                                                                    scale),
                    lambda st: st,
                    state,
                )
            else:
                state = _fold_block_remat(state, qs, ks, vs, qp, kp, False, scale)
        new_states.append(state)
    return new_states


def ring_attention_local(q, k, v, q_pos, kv_pos, *, ring_axis: str | None, ring_size: int, causal: bool = True,
                         scale: float | None = None, num_sub_blocks: int = 2, q_segment_ids=None,
                         kv_segment_ids=None):
    """Ring attention on per-device blocks (call inside `shard_map`).

    q [B, L, H, D]; k, v [B, L, Hkv, D] (H a multiple of Hkv); q_pos, kv_pos [B, L] global positions;
    optional q_segment_ids / kv_segment_ids [B, L] int (packed sequences: a query sees only keys of its segment;
    give both or neither).
    K/V visit every ring rank once (`ring_size - 1` ppermute hops). Returns [B, L, H, D] in q.dtype; a query that
    sees no key (e.g. at an empty slot, position < 0) gets zeros, and K/V at empty slots are zeroed before use.
    """
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    num_sub = num_sub_blocks if lq % num_sub_blocks == 0 else 1
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    k, v = zero_empty_slots(k, kv_pos), zero_empty_slots(v, kv_pos)
    q_meta = (q_pos,) if q_segment_ids is None else (q_pos, q_segment_ids)
    kv_meta = (kv_pos,) if kv_segment_ids is None else (kv_pos, kv_segment_ids)
    qg = q.reshape(b, lq, hkv, g, d)
    q_subs = jnp.split(qg, num_sub, axis=1)
    q_meta_subs = _split_meta(q_meta, num_sub)
    # Initial state built from q so it carries q's varying-manual-axes type (scan carries must keep their type).
    zeros_o = jnp.zeros_like(q_subs[0], dtype=jnp.float32)
    zeros_ml = jnp.moveaxis(zeros_o[..., 0], 1, -1)
    states = [(zeros_o, zeros_ml + _NEG, zeros_ml) for _ in range(num_sub)]

    fold = functools.partial(_fold_blocks_skipping, causal=causal, scale=scale, num_sub=num_sub)
    if ring_size > 1:
        perm = [(i, (i + 1) % ring_size) for i in range(ring_size)]

        def step(carry, _):
            states, k, v, kv_meta = carry
            states = fold(states, q_subs, k, v, q_meta_subs, kv_meta)
            k, v, kv_meta = jax.tree.map(lambda x: lax.ppermute(x, ring_axis, perm), (k, v, kv_meta))
            return (states, k, v, kv_meta), None

        (states, k, v, kv_meta), _ = lax.scan(step, (states, k, v, kv_meta), None, length=ring_size - 1)
    states = fold(states, q_subs, k, v, q_meta_subs, kv_meta)
    # A fully masked row has o = 0 and den = 0: divide by 1 there (0/0 would be NaN and spread to later layers).
    outs = [o / jnp.moveaxis(jnp.where(den > 0, den, 1.0), -1, 1)[..., None] for o, _, den in states]
    return jnp.concatenate(outs, axis=1).reshape(b, lq, h, d).astype(q.dtype)


def sp_attention_local(q, k, v, q_pos, kv_pos, *, ring_axis: str, ulysses_axis: str, ring_size: int,
                       ulysses_size: int, causal: bool = True, scale: float | None = None, num_sub_blocks: int = 2,
                       q_segment_ids=None, kv_segment_ids=None):
    """2D (Ulysses x ring) attention on per-device sequence shards; call inside `shard_map`.

    q [B, L, H, D], k/v [B, L, Hkv, D], q_pos/kv_pos [B, L] global positions of the local tokens (the K/V positions
    are normally the same array as the query positions); optional segment ids [B, L] as in `ring_attention_local`.
    """
    h, hkv = q.shape[2], k.shape[2]
    rep = kv_repeat_factor(h, hkv, ulysses_size)
    if ulysses_size > 1:
        if rep > 1:
            k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)

        def gather_seq(x):  # [B, L, H, D] -> [B, U*L, H/U, D]
            return lax.all_to_all(x, ulysses_axis, split_axis=2, concat_axis=1, tiled=True)

        q, k, v = gather_seq(q), gather_seq(k), gather_seq(v)
        gather = lambda x: None if x is None else lax.all_gather(x, ulysses_axis, axis=1, tiled=True)
        q_pos, kv_pos, q_segment_ids, kv_segment_ids = map(gather, (q_pos, kv_pos, q_segment_ids, kv_segment_ids))
    out = ring_attention_local(q, k, v, q_pos, kv_pos, ring_axis=ring_axis, ring_size=ring_size, causal=causal,
                               scale=scale, num_sub_blocks=num_sub_blocks, q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids)
    if ulysses_size > 1:
        out = lax.all_to_all(out, ulysses_axis, split_axis=1, concat_axis=2, tiled=True)
    return out


def sequence_parallel_attention(q, k, v, *, mesh: Mesh, ring_axis: str, ulysses_axis: str, causal: bool = True,
                                positions=None, segment_ids=None, scale: float | None = None,
                                num_sub_blocks: int = 2):
    """Exact attention on global [B, S, H, D] arrays whose S axis is sharded over (ring_axis, ulysses_axis).

    `positions` ([S] or [B, S], default arange(S)) are the global positions of the tokens in the given order
    (negative = empty slot, never attended to); causal masking uses them, so a zigzag-permuted sequence
    (`layout.zigzag_permutation`) with its positions gives the same result as the unpermuted sequence, permuted.
    `segment_ids` ([S] or [B, S] int, optional): packed sequences; a token attends only to tokens with the same id
    (positions normally restart at 0 in each segment).
    k/v may have fewer heads (GQA). S must be divisible by the number of devices in the two axes; H by the
    Ulysses degree. ValueError for any of these, and for a `ring_axis` / `ulysses_axis` that `mesh` lacks.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v must be [B, S, H, D] with k.shape == v.shape; got {q.shape}, {k.shape}, {v.shape}")
    b, s, h, d = q.shape
    if k.shape[:2] != (b, s) or k.shape[3] != d:
        raise ValueError(f"k/v shape {k.shape} does not match q shape {q.shape} (GQA may only reduce heads)")
    ring_size, ulysses_size = mesh_degrees(mesh, ring_axis, ulysses_axis)
    n = ring_size * ulysses_size
    if s % n:
        raise ValueError(f"sequence length {s} must be divisible by ring x ulysses = {n}; pad it first "
                         "(`layout.padded_length`)")
    kv_repeat_factor(h, k.shape[2], ulysses_size)
    pos = _as_batch_positions(positions, b, s)
    seq = P(None, (ring_axis, ulysses_axis))
    fn = functools.partial(sp_attention_local, ring_axis=ring_axis, ulysses_axis=ulysses_axis, ring_size=ring_size,
                           ulysses_size=ulysses_size, causal=causal, scale=scale, num_sub_blocks=num_sub_blocks)
    meta = (pos,) if segment_ids is None else (pos, _as_batch_positions(segment_ids, b, s, "segment_ids"))

    def local(q, k, v, p, *seg):
        seg = seg[0] if seg else None
        return fn(q, k, v, p, p, q_segment_ids=seg, kv_segment_ids=seg)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(seq,) * (3 + len(meta)), out_specs=seq)
    return mapped(q, k, v, *meta)

