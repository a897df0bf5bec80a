"""One LServe decode step over a paged KV cache: dense KV heads read their selected pages, streaming KV heads
their sink and local pages.

Every implementation reads page lists (`decode_page_lists`), one per list head: a KV head (its query group shares
the list: dense decode, streaming heads, the shared-list option) or a query head (LServe's per-query-head
selection, omniserve decoderMaskedMultiheadAttentionTemplate.hpp:927: query head h reads its own pages of KV
head h // group), and masks tokens exactly: position < length, and for streaming heads (position < sink or
length - 1 - position < local). The values of slots at or past the length (a partial page's unwritten tail)
are zeroed with a select, not only given zero weight: 0 * a stale NaN / inf is NaN.
- `_xla_decode`: gathers the listed pages; with static `streaming_heads` the two head types get lists of their
  own width, so streaming heads read only sink + local pages.
- `_pallas_tpu_decode`: grid (B, list heads, list slots), physical page ids in scalar prefetch so the pipeline
  DMAs one [page_size, D] page per step; query block [Hq / list heads, D] (a full dim), so the block shapes are
  Mosaic-legal.
- `_pallas_gpu_decode`: flash-decoding, grid (B, list heads, splits of the list), in-kernel loop over the
  split's slots loading pages from the whole pool (Triton has no scalar prefetch), partial softmax states merged
  in XLA; the query rows are padded to 16 for `dot`. Splitting matters: with grid (B, Hkv) alone a batch-1 step
  ran on 8 of an H200's 132 SMs (155 GB/s reading every page).
Backends actually executed: CPU (XLA; both kernels in interpret mode, the TPU-style one also under
`pltpu.force_tpu_interpret_mode()`) and an NVIDIA H200 (the Triton-style kernel compiled, against the reference
in tests/test_pallas_device.py, per-KV-head lists only: the per-query-head lists have not run on a GPU yet;
the select that zeroes padded-slot values was added after that run and has run in interpret mode only).
The TPU-style kernel lowers for TPU (Pallas -> Mosaic) through `jax.export` but
has not run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    MASK_VALUE,
    check_gqa,
    check_int,
    check_streaming_heads,
    default_scale,
    masked_softmax,
    resolve_implementation,
    token_mask,
)
from pallas_kernels.paged import check_page_table


@dataclasses.dataclass(frozen=True)
class _DecodeCfg:
    sink: int
    local: int
    scale: float
    page_size: int


def streaming_page_list(lengths, *, sink: int, local: int, page_size: int, max_pages: int):
    """int32 [B, n] logical pages holding a streaming head's sink and local tokens (-1: none), no duplicates."""
    n_sink = min(-(-sink // page_size), max_pages)
    n_local = min((local - 1) // page_size + 2, max_pages)
    n_pages = (lengths + page_size - 1) // page_size
    first = jnp.maximum(lengths - local, 0) // page_size
    local_pages = first[:, None] + jnp.arange(n_local)[None, :]
    local_pages = jnp.where((local_pages >= n_sink) & (local_pages < n_pages[:, None]), local_pages, -1)
    sink_pages = jnp.where(jnp.arange(n_sink)[None, :] < n_pages[:, None], jnp.arange(n_sink)[None, :], -1)
    return jnp.concatenate([sink_pages, local_pages], axis=1).astype(jnp.int32)


def decode_page_lists(page_table, lengths, selected_pages, streaming, *, sink, local, page_size):
    """Logical page lists [B, Hl, W] (-1: skip), one per list head: Hl = selected_pages.shape[1] (KV heads, or
    query heads for per-query-head selection) or Hkv when selected_pages is None. streaming is bool [Hkv] (numpy
    or traced); with per-query-head lists a streaming KV head's list is repeated for each of its query heads."""
    b, max_pages = page_table.shape
    hkv = np.shape(streaming)[0]
    hl = hkv if selected_pages is None else selected_pages.shape[1]
    if selected_pages is None:  # dense heads read every page
        n_pages = (lengths + page_size - 1) // page_size
        all_pages = jnp.arange(max_pages)[None, :]
        selected_pages = jnp.broadcast_to(jnp.where(all_pages < n_pages[:, None], all_pages, -1)[:, None],
                                          (b, hl, max_pages))
    stream_list = streaming_page_list(lengths, sink=sink, local=local, page_size=page_size, max_pages=max_pages)
    width = max(selected_pages.shape[2], stream_list.shape[1])
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])], constant_values=-1)
    flags = jnp.repeat(jnp.asarray(streaming), hl // hkv)
    return jnp.where(flags[None, :, None], pad(stream_list)[:, None], pad(selected_pages))


def sparse_paged_decode_reference(q, k_pages, v_pages, page_table, lengths, selected_pages, *, streaming_heads,
                                  sink, local, scale=None):
    """Plain-JAX reference: every cached token of every head, masked to the page selection / Λ pattern.
    selected_pages: None, [B, Hkv, n] (one list per KV head) or [B, Hq, n] (one list per query head)."""
    b, hq, d = q.shape
    hkv, _, ps, _ = k_pages.shape
    g = hq // hkv
    max_pages = page_table.shape[1]
    k = k_pages[:, page_table].reshape(hkv, b, max_pages * ps, d).astype(jnp.float32)
    v = v_pages[:, page_table].reshape(hkv, b, max_pages * ps, d).astype(jnp.float32)
    pos = jnp.arange(max_pages * ps)
    stream = jnp.asarray(streaming_heads, bool)[None, :, None, None]
    if selected_pages is None:
        chosen = jnp.ones((b, hkv, 1, max_pages * ps), bool)
    else:
        onehot = (selected_pages[..., None] == jnp.arange(max_pages)).any(2)  # [B, Hl, max_pages]
        chosen = jnp.repeat(onehot, ps, axis=-1).reshape(b, hkv, -1, max_pages * ps)
    qpos = (lengths - 1)[:, None, None, None]
    mask = token_mask(qpos, pos, stream, sink, local) & (stream | chosen)  # [B, Hkv, 1 or G, T]
    v = jnp.where((pos < lengths[:, None])[None, :, :, None], v, 0.0)  # a weight of 0 times a stale NaN is NaN
    s = jnp.einsum("bhgd,hbkd->bhgk", q.astype(jnp.float32).reshape(b, hkv, g, d), k) * default_scale(scale, d)
    o = jnp.einsum("bhgk,hbkd->bhgd", masked_softmax(s, mask), v)
    return o.reshape(b, hq, d).astype(q.dtype)


def _xla_decode_group(q, k_pages, v_pages, page_table, lengths, lists, stream, cfg: _DecodeCfg):
    """q [B, h, G, D]; k/v_pages [h, P, ps, D]; lists [B, h, R, W] with R = 1 (per KV head) or G (per query
    head); stream bool [h]."""
    ps = cfg.page_size
    b, h, g, d = q.shape
    r = lists.shape[2]
    phys = jnp.take_along_axis(page_table[:, None, None, :], jnp.maximum(lists, 0), axis=3)  # [B, h, R, W]
    heads = jnp.arange(k_pages.shape[0])[None, :, None, None]
    k, v = k_pages[heads, phys], v_pages[heads, phys]  # [B, h, R, W, ps, D]
    pos = lists[..., None] * ps + jnp.arange(ps)
    qpos = (lengths - 1)[:, None, None, None, None]
    mask = (lists[..., None] >= 0) & (pos < lengths[:, None, None, None, None])
    v = jnp.where(mask[..., None], v, jnp.zeros((), v.dtype))  # padded slots of a partial page: 0 * NaN is NaN
    mask &= token_mask(qpos, pos, jnp.asarray(stream)[None, :, None, None, None], cfg.sink, cfg.local)
    qr = q.reshape(b, h, r, g // r, d)
    s = jnp.einsum("bhrgd,bhrwpd->bhrgwp", qr, k, preferred_element_type=jnp.float32) * cfg.scale
    w = s.shape[4]
    mask = jnp.broadcast_to(mask[:, :, :, None], s.shape).reshape(b, h, r, g // r, w * ps)
    p = masked_softmax(s.reshape(b, h, r, g // r, w * ps), mask).reshape(s.shape)
    o = jnp.einsum("bhrgwp,bhrwpd->bhrgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, h, g, d)


def _xla_decode(q, k_pages, v_pages, page_table, lengths, selected_pages, flags, static, cfg):
    b, hq, d = q.shape
    hkv = k_pages.shape[0]
    g = hq // hkv
    qg = q.reshape(b, hkv, g, d)
    per_list = lambda lists: lists.reshape(b, hkv, lists.shape[1] // hkv, lists.shape[2])
    if static is None:  # traced pattern: one list per head of the wider width
        lists = decode_page_lists(page_table, lengths, selected_pages, flags.astype(bool), sink=cfg.sink,
                                  local=cfg.local, page_size=cfg.page_size)
        o = _xla_decode_group(qg, k_pages, v_pages, page_table, lengths, per_list(lists), flags.astype(bool), cfg)
        return o.reshape(b, hq, d).astype(q.dtype)
    outs, order = [], []
    for idx, is_stream in ((np.flatnonzero(static), True), (np.flatnonzero(~static), False)):
        if not len(idx):
            continue
        if is_stream:
            lists = streaming_page_list(lengths, sink=cfg.sink, local=cfg.local, page_size=cfg.page_size,
                                        max_pages=page_table.shape[1])
            lists = jnp.broadcast_to(lists[:, None, None], (b, len(idx), 1, lists.shape[1]))
        else:
            sel = selected_pages
            if sel is not None:  # the rows of these KV heads (or of their query heads)
                r = sel.shape[1] // hkv
                sel = sel.reshape(b, hkv, r, -1)[:, idx].reshape(b, len(idx) * r, -1)
            lists = decode_page_lists(page_table, lengths, sel, np.zeros(len(idx), bool), sink=cfg.sink,
                                      local=cfg.local, page_size=cfg.page_size)
            lists = lists.reshape(b, len(idx), -1, lists.shape[2])
        outs.append(_xla_decode_group(qg[:, idx], k_pages[idx], v_pages[idx], page_table, lengths, lists,
                                      np.full(len(idx), is_stream), cfg))
        order.append(idx)
    o = jnp.concatenate(outs, axis=1)[:, np.argsort(np.concatenate(order))]
    return o.reshape(b, hq, d).astype(q.dtype)


def _physical_lists(page_table, lists):
    """Physical page per list slot; skipped slots repeat the previous live page so the pipeline skips the DMA."""
    live_slot = jnp.where(lists >= 0, jnp.arange(lists.shape[-1]), 0)
    prev = lax.cummax(live_slot, axis=lists.ndim - 1)
    logical = jnp.maximum(jnp.take_along_axis(lists, prev, axis=-1), 0)
    return jnp.take_along_axis(page_table[:, None, :], logical, axis=2).astype(jnp.int32)


def _decode_step(q, k, v, m, l, acc, page, length, stream, cfg: _DecodeCfg):
    """Online-softmax update with logical page `page` (< 0: a skipped slot, nothing visible): q [G, D],
    k/v [ps, D]. Values of tokens at or past `length` (the unwritten tail of a partial page, or a skipped slot's
    stand-in page) are zeroed with a select: their weight is 0, but 0 * a stale NaN / inf would still be NaN."""
    ps = cfg.page_size
    pos = page * ps + lax.broadcasted_iota(jnp.int32, (q.shape[0], ps), 1)
    vpos = page * ps + lax.broadcasted_iota(jnp.int32, (ps, 1), 0)
    v = jnp.where((page >= 0) & (vpos < length), v, jnp.zeros((), v.dtype))
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * cfg.scale
    mask = (page >= 0) & (pos < length) & token_mask(length - 1, pos, stream, cfg.sink, cfg.local)
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    acc_new = alpha * acc + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)
    return m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), acc_new


def _pallas_tpu_decode(q, k_pages, v_pages, page_table, lengths, lists, flags, cfg, interpret):
    """Grid (B, list heads, list slots); a list head is a KV head (its query group shares the list) or, with
    per-query-head lists, one query head reading its KV head's pages."""
    b, hq, d = q.shape
    hkv, _, ps, _ = k_pages.shape
    hl, w = lists.shape[1], lists.shape[2]
    rows, per_kv = hq // hl, hl // hkv
    phys = _physical_lists(page_table, lists)
    flags = jnp.repeat(flags, per_kv)

    def kernel(lists_ref, phys_ref, len_ref, flag_ref, q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr):
        bi, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        page = lists_ref[(bi * hl + h) * w + t]

        @pl.when(t == 0)
        def _init():
            m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
            l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
            acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

        @pl.when(page >= 0)
        def _step():
            m, l_, acc = _decode_step(q_ref[...], k_ref[...], v_ref[...], m_scr[...], l_scr[...], acc_scr[...],
                                      page, len_ref[bi], flag_ref[h] != 0, cfg)
            m_scr[...], l_scr[...], acc_scr[...] = m, l_, acc

        @pl.when(t == w - 1)
        def _finish():
            l_ = l_scr[...]
            o_ref[...] = (acc_scr[...] / jnp.where(l_ == 0.0, 1.0, l_)).astype(o_ref.dtype)

    def kv_map(bi, h, t, lists_ref, phys_ref, *_):
        return h // per_kv, phys_ref[(bi * hl + h) * w + t], 0, 0

    def q_map(bi, h, t, *_):
        return bi, h, 0, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(b, hl, w),
        in_specs=[pl.BlockSpec((None, None, rows, d), q_map), pl.BlockSpec((None, None, ps, d), kv_map),
                  pl.BlockSpec((None, None, ps, d), kv_map)],
        out_specs=pl.BlockSpec((None, None, rows, d), q_map),
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)],
    )
    out = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((b, hl, rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="sparse_paged_decode_tpu",
    )(lists.reshape(-1), phys.reshape(-1), lengths.astype(jnp.int32), flags, q.reshape(b, hl, rows, d), k_pages,
      v_pages)
    return out.reshape(b, hq, d)


# Split the page list so that batch x KV heads x splits fills a GPU (132 SMs on an H100/H200) twice over.
_GPU_TARGET_PROGRAMS = 264


def _pallas_gpu_decode(q, k_pages, v_pages, page_table, lengths, lists, flags, cfg, interpret):
    """Flash-decoding: grid (B, list heads, splits), each program runs the online softmax over its share of a
    page list (a KV head's, shared by its query group, or one query head's); the partial (max, sum, accumulator)
    triples are merged in XLA."""
    b, hq, d = q.shape
    hkv, num_pages, ps, _ = k_pages.shape
    hl = lists.shape[1]
    rows, per_kv = hq // hl, hl // hkv
    gp = max(16, int(pl.next_power_of_2(rows)))  # Triton dot needs >= 16 rows
    w = int(pl.next_power_of_2(lists.shape[2]))
    splits = int(min(w, pl.next_power_of_2(-(-_GPU_TARGET_PROGRAMS // (b * hl)))))
    chunk = w // splits
    lists = jnp.pad(lists, ((0, 0), (0, 0), (0, w - lists.shape[2])), constant_values=-1)
    phys = _physical_lists(page_table, lists)
    qp = jnp.pad(q.reshape(b, hl, rows, d), ((0, 0), (0, 0), (0, gp - rows), (0, 0)))
    meta = jnp.stack([lengths.astype(jnp.int32)[:, None].repeat(hl, 1),
                      jnp.broadcast_to(jnp.repeat(flags, per_kv), (b, hl))], -1)

    def kernel(lists_ref, phys_ref, meta_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref):
        length, stream = meta_ref[0], meta_ref[1] != 0
        q_blk = q_ref[...]

        def body(t, carry):
            page, pid = lists_ref[t], phys_ref[t]
            return _decode_step(q_blk, k_ref[pid], v_ref[pid], *carry, page, length, stream, cfg)

        carry = (jnp.full((gp, 1), MASK_VALUE, jnp.float32), jnp.zeros((gp, 1), jnp.float32),
                 jnp.zeros((gp, d), jnp.float32))
        m, l_, acc = lax.fori_loop(0, chunk, body, carry)
        acc_ref[...], m_ref[...], l_ref[...] = acc, m[:, 0], l_[:, 0]

    slot_spec = pl.BlockSpec((None, None, chunk), lambda bi, h, s: (bi, h, s))
    row_spec = pl.BlockSpec((None, None, None, gp), lambda bi, h, s: (bi, h, s, 0))
    pool_spec = pl.BlockSpec((None, num_pages, ps, d), lambda bi, h, s: (h // per_kv, 0, 0, 0))
    acc, m, l_ = pl.pallas_call(
        kernel, grid=(b, hl, splits),
        in_specs=[slot_spec, slot_spec,
                  pl.BlockSpec((None, None, 2), lambda bi, h, s: (bi, h, 0)),
                  pl.BlockSpec((None, None, gp, d), lambda bi, h, s: (bi, h, 0, 0)),
                  pool_spec, pool_spec],
        out_specs=[pl.BlockSpec((None, None, None, gp, d), lambda bi, h, s: (bi, h, s, 0, 0)), row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((b, hl, splits, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hl, splits, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, hl, splits, gp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="sparse_paged_decode_gpu",
    )(lists, phys, meta, qp, k_pages, v_pages)
    # A split with no visible token has m = MASK_VALUE and l = 0, so its weight is 0 (or its sum is 0).
    weight = jnp.exp(m - m.max(axis=2, keepdims=True))
    total = jnp.sum(weight * l_, axis=2)[..., None]
    out = jnp.sum(weight[..., None] * acc, axis=2) / jnp.where(total == 0.0, 1.0, total)
    return out[:, :, :rows].reshape(b, hq, d).astype(q.dtype)


_KERNELS = {"tpu": _pallas_tpu_decode, "gpu": _pallas_gpu_decode, "interpret": _pallas_tpu_decode}


def _check_decode_inputs(q, k_pages, v_pages, page_table, lengths, selected_pages, streaming_heads, sink, local):
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"q must be [B, Hq, D] and k_pages [Hkv, P, page_size, D], got {q.shape}, {k_pages.shape}")
    b, hq, d = q.shape
    hkv, num_pages, ps, dk = k_pages.shape
    if dk != d or v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} / v_pages {v_pages.shape} do not match q {q.shape}")
    check_gqa(hq, hkv)
    if page_table.ndim != 2 or page_table.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"page_table must be [{b}, max_pages] and lengths [{b}], got {page_table.shape}, "
                         f"{lengths.shape}")
    if selected_pages is not None and (selected_pages.ndim != 3 or selected_pages.shape[0] != b
                                       or selected_pages.shape[1] not in (hkv, hq)):
        raise ValueError(f"selected_pages must be [{b}, {hkv}, n] (per KV head) or [{b}, {hq}, n] (per query "
                         f"head), got {selected_pages.shape}")
    check_int("sink", sink, 0)
    check_int("local", local, 1)
    check_page_table(page_table, num_pages, lengths, ps)
    if not isinstance(lengths, jax.core.Tracer):
        lens = np.asarray(lengths)
        if (lens < 0).any() or (lens > page_table.shape[1] * ps).any():
            raise ValueError(f"lengths {lens.tolist()} must be in [0, {page_table.shape[1] * ps}]")
    return check_streaming_heads(streaming_heads, hkv)


def sparse_paged_decode(q, k_pages, v_pages, page_table, lengths, selected_pages, *, streaming_heads, sink, local,
                        scale=None, implementation=None, interpret=False):
    """One decode step of LServe's hybrid sparse attention over a paged KV cache.

    Args:
      q: [B, Hq, D], the query of the newest token (already in the cache, at position lengths - 1). A sequence
        with length 0 (an empty batch slot) sees no token and gets zeros in every implementation.
      k_pages, v_pages: [Hkv, P, page_size, D] page pools; page_table: int32 [B, max_pages]; lengths: int32 [B].
      selected_pages: int32 [B, Hq, n] distinct logical pages per query head (LServe's per-query-head selection:
        each query head reads its own pages of its KV head's pool) or [B, Hkv, n] (one list shared by a KV head's
        query group), -1 = unused, e.g. from `select_pages`; None reads every page (dense decode).
      streaming_heads: bool [Hkv]; streaming heads ignore `selected_pages` and read tokens with
        position < sink or lengths - 1 - position < local.
      sink, local: Python ints, sink >= 0, local >= 1.
      implementation: None (Pallas on GPU/TPU, XLA elsewhere), "pallas" or "xla"; interpret: Pallas interpreter.
    Returns:
      [B, Hq, D] in q.dtype.
    """
    flags, static = _check_decode_inputs(q, k_pages, v_pages, page_table, lengths, selected_pages, streaming_heads,
                                         sink, local)
    cfg = _DecodeCfg(sink, local, default_scale(scale, q.shape[-1]), k_pages.shape[2])
    lengths = jnp.asarray(lengths, jnp.int32)
    impl, flavour = resolve_implementation(implementation, interpret)
    if impl == "xla":
        return _xla_decode(q, k_pages, v_pages, page_table, lengths, selected_pages, flags, static, cfg)
    stream = flags.astype(bool) if static is None else static
    lists = decode_page_lists(page_table, lengths, selected_pages, stream, sink=sink, local=local,
                              page_size=cfg.page_size)
    kernel = functools.partial(_KERNELS[flavour], interpret=flavour == "interpret")
    return kernel(q, k_pages, v_pages, page_table, lengths, lists, flags, cfg)
