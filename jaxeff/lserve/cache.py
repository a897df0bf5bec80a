"""LServe's paged KV cache: separate page pools for retrieval and streaming KV heads, as a decoder cache.

Per layer, the retrieval heads own a `pallas_kernels.PagedKVCache` (every logical page of a sequence has its own
physical page; keys carry per-logical-page min/max statistics) and the streaming heads own a small pool holding
their sink pages and a ring of local pages: the streaming page table maps logical page n >= n_sink to ring slot
(n - n_sink) % n_ring, so a streaming head stores O(sink + local) tokens whatever the context.

Windows per phase (omniserve attn_config.py, ctx_attn_init.py:23-50): a prefill attends with every head dense
(`sparse_prefill=False`, the EngineArgs default) or with streaming heads on the prefill window (`prefill_sink` +
`prefill_local`, 128 + 8192); decode streaming heads read the decode window (`sink` + `local`, 128 + 256, the
current token included). When a prompt takes several prefill chunks, later chunks read the earlier tokens from
the streaming pool, so during prefill its ring covers the prefill window (the whole prompt for a dense prefill);
`to_decode` then keeps only the decode window's pages (2 sink + 5 local pages by default), as the official
streaming pool does.

`attend` has two static modes:
- prefill (`prefill_offset` = position of the chunk's first token, the same for every row): the prefix is gathered
  from both pools and the chunk goes through one `pallas_kernels.hybrid_attention` call (retrieval heads dense,
  streaming heads Λ-shaped and block-sparse, or every head dense); then the chunk is appended to both pools (only
  the tokens a streaming head keeps go to its ring, so no two writes hit the same slot).
- decode (`prefill_offset` = -1): append the token, then for retrieval heads (re)select pages with the Quest
  score per query head (omniserve decoding_attention.py:87-143, 257-268): a row reselects when its history length
  (tokens before the current one) is a multiple of `reselect_every`, and at the first decode step after a prompt
  (its stored list is empty); otherwise it reuses its list. Since `page_size % reselect_every == 0`, every newly
  opened page triggers a reselection, so the list always ends with the current page. Then
  `pallas_kernels.sparse_paged_decode` on each pool. Counters record the KV pages read (distinct pages per KV
  head: a GQA group's query heads may pick different pages) and the min/max statistics entries read.
Kernels: `implementation=None` dispatches to the Pallas (and cuDNN) GPU kernels on a GPU, the Pallas TPU kernels
on a TPU and XLA on CPU. Executed on CPU only; the GPU path has not run end to end yet.

Tensor parallel (`mesh` set, `partition_specs`): a pool whose KV-head count divides the mesh axis is split by
heads and decodes per device under `jax.shard_map` (each device its heads' pages, query heads and page lists);
other pools are replicated. A prefill runs per device (`jaxeff.models.sharding.shard_heads`) when every device gets
the same streaming flags; a sparse prefill whose devices would get different flags stays one call under GSPMD
(a Pallas prefill then runs whole on gathered inputs: correct, not split).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

import pallas_kernels
from jaxeff.duo_attention import check_head_mask
from jaxeff.lserve.config import LServeConfig
from jaxeff.models.sharding import heads_spec, shard_heads
from pallas_kernels.paged import MIN_SELECTED_PAGES


def _query_heads(kv_heads, group: int) -> np.ndarray:
    return np.asarray([h * group + j for h in kv_heads for j in range(group)], np.int32)


def streaming_pages(cfg: LServeConfig, phase: str = "decode") -> tuple[int, int]:
    """(sink pages, ring pages) a streaming head keeps: the decode window, or (phase="prefill") what later prefill
    chunks read: the prefill window for a sparse prefill, every page for a dense one. The ring covers every local
    page a step reads."""
    if phase == "decode":
        sink, local = cfg.sink, cfg.local
    elif phase == "prefill":
        sink, local = (cfg.prefill_sink, cfg.prefill_local) if cfg.sparse_prefill else (0, cfg.max_len)
    else:
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    n_sink = min(-(-sink // cfg.page_size), cfg.max_pages)
    n_ring = min((local - 1) // cfg.page_size + 2, max(cfg.max_pages - n_sink, 1))
    return n_sink, n_ring


def ring_page_table(batch: int, max_pages: int, n_sink: int, n_ring: int) -> np.ndarray:
    n = np.arange(max_pages)
    slot = np.where(n < n_sink, n, n_sink + (n - n_sink) % n_ring)
    return (np.arange(batch)[:, None] * (n_sink + n_ring) + slot[None]).astype(np.int32)


def _gather_prefix(pool: pallas_kernels.PagedKVCache, length: int):
    """Tokens [0, length) of every sequence as k, v [B, length, H, D] (positions a ring no longer holds are stale;
    the Λ mask never reads them)."""
    pos = np.arange(length)
    phys = pool.page_table[:, pos // pool.page_size]  # [B, length]
    k = pool.k_pages[:, phys, pos % pool.page_size]  # [H, B, length, D]
    v = pool.v_pages[:, phys, pos % pool.page_size]
    return k.transpose(1, 2, 0, 3), v.transpose(1, 2, 0, 3)


def _append_ring(pool: pallas_kernels.PagedKVCache, k, v, n_new, n_sink: int, n_ring: int):
    """Append to a streaming pool, writing only pages that survive this append (sink pages and the last n_ring)."""
    ps = pool.page_size
    n_last = (pool.lengths + n_new - 1) // ps
    page = jnp.arange(pool.page_table.shape[1])[None]
    keep = (page < n_sink) | (page > n_last[:, None] - n_ring)
    table = jnp.where(keep, pool.page_table, pool.k_pages.shape[1])  # out of range: the write is dropped
    new = pallas_kernels.append_kv(dataclasses.replace(pool, page_table=table), k, v, n_new)
    return dataclasses.replace(new, page_table=pool.page_table)


@partial(jax.jit, static_argnames=("n_sink", "n_ring"))
def _compact_ring(pool: pallas_kernels.PagedKVCache, n_sink: int, n_ring: int) -> pallas_kernels.PagedKVCache:
    """The pool re-packed into a smaller ring: sink pages and the last n_ring pages of each sequence."""
    batch, max_pages = pool.page_table.shape
    table = jnp.asarray(ring_page_table(batch, max_pages, n_sink, n_ring))
    n = jnp.arange(max_pages)[None]
    n_last = (pool.lengths[:, None] - 1) // pool.page_size
    keep = (n <= n_last) & ((n < n_sink) | (n > n_last - n_ring))
    num_pages = batch * (n_sink + n_ring)
    dst = jnp.where(keep, table, num_pages)  # out of range: dropped

    def move(x):
        return jnp.zeros((x.shape[0], num_pages) + x.shape[2:], x.dtype).at[:, dst].set(x[:, pool.page_table],
                                                                                       mode="drop")

    return pallas_kernels.PagedKVCache(move(pool.k_pages), move(pool.v_pages), move(pool.kmin), move(pool.kmax),
                                       table, pool.lengths)


@struct.dataclass
class LServeCache:
    retrieval_pools: tuple  # per layer PagedKVCache over the layer's retrieval heads
    streaming_pools: tuple  # per layer PagedKVCache over its streaming heads (ring page table)
    selected: tuple  # per layer int32 [B, rows, n]: the reused page lists (rows: query or KV heads); -1 = none yet
    pages_read: jnp.ndarray  # int32 [B]: KV pages (one KV head's page) read by decode steps so far
    stats_read: jnp.ndarray  # int32 [B]: logical-page min/max entries (one KV head's) read by page selection
    retrieval: tuple = struct.field(pytree_node=False)
    streaming: tuple = struct.field(pytree_node=False)
    config: LServeConfig = struct.field(pytree_node=False)
    ring: tuple = struct.field(pytree_node=False)  # (sink pages, ring pages) of the streaming pools
    prefill_offset: int = struct.field(pytree_node=False, default=-1)
    mesh: Any = struct.field(pytree_node=False, default=None)  # tensor parallel: the model's mesh (None: none)
    mesh_axis: str = struct.field(pytree_node=False, default="model")

    @classmethod
    def init(cls, streaming_heads, batch: int, head_dim: int, config: LServeConfig, dtype=jnp.float32, *,
             group: int = 1, prefill_chunks: int = 1, mesh=None, mesh_axis: str = "model"):
        """streaming_heads: bool [layers, kv_heads], True = streaming head (the inverse of a DuoAttention selection;
        `Engine` takes either as `retrieval_heads=` / `streaming_heads=`); group: query heads per KV head;
        prefill_chunks: prefill calls the prompt takes (with more than one, the streaming ring first covers the
        prefill window); mesh / mesh_axis: the mesh a tensor-parallel model is split over
        (`jaxeff.models.sharding.model_mesh`), so that decode runs the paged kernels per device (`partition_specs`).
        Place the arrays with `jaxeff.models.sharding.init_cache` / `shard_cache`. ValueError for a mask that is not
        bool [layers, kv_heads] (gate values alpha, 0/1 integers: `jaxeff.duo_attention.check_head_mask`)."""
        mask = check_head_mask(streaming_heads, "streaming_heads", streaming=True)
        ps, max_pages = config.page_size, config.max_pages
        dec = streaming_pages(config)
        ring = dec
        if prefill_chunks > 1:
            pre = streaming_pages(config, "prefill")
            n_sink = max(dec[0], pre[0])
            ring = (n_sink, min(max(dec[1], pre[1]), max(max_pages - n_sink, 1)))
        ret = tuple(tuple(int(h) for h in np.flatnonzero(~row)) for row in mask)
        stm = tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in mask)
        table = ring_page_table(batch, max_pages, *ring)
        kw = dict(page_size=ps, logical_page_size=config.logical_page_size, dtype=dtype)
        rows = group if config.per_query_head else 1
        n_sel = max(MIN_SELECTED_PAGES, config.token_budget // ps)
        return cls(
            retrieval_pools=tuple(pallas_kernels.init_paged_kv_cache(batch, len(r), head_dim,
                                                                     max_pages_per_seq=max_pages, **kw) for r in ret),
            streaming_pools=tuple(pallas_kernels.init_paged_kv_cache(
                batch, len(s), head_dim, max_pages_per_seq=max_pages, num_pages=batch * sum(ring),
                page_table=table, **kw) for s in stm),
            selected=tuple(jnp.full((batch, len(r) * rows, n_sel), -1, jnp.int32) for r in ret),
            pages_read=jnp.zeros((batch,), jnp.int32), stats_read=jnp.zeros((batch,), jnp.int32),
            retrieval=ret, streaming=stm, config=config, ring=ring, mesh=mesh, mesh_axis=mesh_axis,
        )

    def partition_specs(self, n: int, axis: str) -> LServeCache:
        """Tensor-parallel layout over n devices (`jaxeff.models.sharding.cache_specs`): each pool's pages and key
        statistics [heads, pages, ...] split by KV heads where the pool's head count divides n evenly (from
        `heads_spec`), else replicated (fewer heads than devices, or a count that does not split); page tables,
        lengths, page lists and counters replicated (small, and every device's heads read the same tables)."""
        rep = PartitionSpec()

        def pool(p):
            h = heads_spec(p.k_pages.shape[0], 0, n, axis, by_sequence=False, head_dim=0)
            return dataclasses.replace(p, k_pages=h, v_pages=h, kmin=h, kmax=h, page_table=rep, lengths=rep)

        return self.replace(retrieval_pools=tuple(map(pool, self.retrieval_pools)),
                            streaming_pools=tuple(map(pool, self.streaming_pools)),
                            selected=tuple(rep for _ in self.selected), pages_read=rep, stats_read=rep)

    def to_decode(self) -> LServeCache:
        """After the prompt: decode mode, streaming pools shrunk to the decode window, page lists cleared (the
        first decode step selects; omniserve llama_w16a16_unpad.py:211-215)."""
        dec = streaming_pages(self.config)
        pools = self.streaming_pools
        if dec != self.ring:
            pools = tuple(_compact_ring(p, *dec) if s else p for p, s in zip(pools, self.streaming))
        return self.replace(streaming_pools=pools, ring=dec, prefill_offset=-1,
                            selected=tuple(jnp.full_like(s, -1) for s in self.selected))

    def kv_nbytes(self) -> int:
        """Stored K/V bytes of both pools (statistics excluded; see `stats_nbytes`)."""
        pools = self.retrieval_pools + self.streaming_pools
        return sum(p.k_pages.nbytes + p.v_pages.nbytes for p in pools)

    def stats_nbytes(self) -> int:
        return sum(p.kmin.nbytes + p.kmax.nbytes for p in self.retrieval_pools)

    def attend(self, layer: int, q, k, v, q_positions, *, sliding_window=None, scale=None, implementation=None):
        if sliding_window is not None:
            raise ValueError("LServeCache does not support sliding-window models (Mistral v0.1 / Qwen2 windows)")
        cfg = self.config
        impl = cfg.implementation if implementation is None else implementation
        ret, stm = self.retrieval[layer], self.streaming[layer]
        rp, sp = self.retrieval_pools[layer], self.streaming_pools[layer]
        n_new = jnp.sum(q_positions >= 0, axis=1).astype(jnp.int32)
        if self.prefill_offset >= 0:
            out = self._prefill(layer, q, k, v, scale, impl)
        if ret:
            rp = pallas_kernels.append_kv(rp, k[:, :, ret], v[:, :, ret], n_new)
        if stm:
            sp = _append_ring(sp, k[:, :, stm], v[:, :, stm], n_new, *self.ring)
        cache = self.replace(retrieval_pools=_set(self.retrieval_pools, layer, rp),
                             streaming_pools=_set(self.streaming_pools, layer, sp))
        if self.prefill_offset >= 0:
            return out, cache
        return cache._decode(layer, q, (rp if ret else sp).lengths, scale, impl)

    def _prefill(self, layer, q, k, v, scale, impl):
        off, cfg = self.prefill_offset, self.config
        ret, stm = self.retrieval[layer], self.streaming[layer]
        if off:
            parts = [_gather_prefix(pools[layer], off) for pools, heads in
                     ((self.retrieval_pools, ret), (self.streaming_pools, stm)) if heads]
            inv = np.argsort(np.asarray(ret + stm))
            pk = jnp.concatenate([p[0] for p in parts], axis=2)[:, :, inv].astype(k.dtype)
            pv = jnp.concatenate([p[1] for p in parts], axis=2)[:, :, inv].astype(v.dtype)
            k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
        flags = np.zeros(k.shape[2], bool)
        if cfg.sparse_prefill:
            flags[list(stm)] = True

        def run(q, k, v, flags=flags):
            return pallas_kernels.hybrid_attention(q, k, v, streaming_heads=flags, sink=cfg.prefill_sink,
                                                   local=cfg.prefill_local, q_offset=off, scale=scale,
                                                   implementation=impl)

        local = self._device_flags(flags)
        if local is None:
            return run(q, k, v)
        return shard_heads(partial(run, flags=local), self.mesh, self.mesh_axis)(q, k, v)

    def _device_flags(self, flags: np.ndarray) -> np.ndarray | None:
        """On a mesh: the streaming flags of one device's KV heads in a prefill split over heads (`shard_heads`),
        when every device has the same ones (the kernel's schedule is static, so one program serves all devices:
        always so for a dense prefill); else None (the call stays whole under GSPMD, which runs a Pallas prefill
        on gathered inputs)."""
        if self.mesh is None:
            return None
        n, h = self.mesh.shape[self.mesh_axis], len(flags)
        per_device = flags.reshape(n, h // n) if h % n == 0 else np.repeat(flags, n // h)[:, None]
        return per_device[0] if (per_device == per_device[0]).all() else None

    def _select(self, layer, q_ret, pool, lengths):
        """Page lists of this step: reselect the rows whose history length is a multiple of reselect_every or
        that have no list yet, reuse the others. Returns (lists, rows that reselected)."""
        cfg = self.config
        old = self.selected[layer]
        rows = ((lengths - 1) % cfg.reselect_every == 0) | (old < 0).all(axis=(1, 2))

        def choose():
            scores = pallas_kernels.page_scores(q_ret, pool.kmin, pool.kmax, pool.page_table, lengths,
                                                logical_page_size=cfg.logical_page_size,
                                                per_query_head=cfg.per_query_head)
            new = pallas_kernels.select_pages(scores, lengths, budget=cfg.token_budget, page_size=cfg.page_size)
            return jnp.where(rows[:, None, None], new, old)

        return jax.lax.cond(rows.any(), choose, lambda: old), rows

    def _decode(self, layer, q, lengths, scale, impl):
        cfg = self.config
        ret, stm = self.retrieval[layer], self.streaming[layer]
        group = q.shape[2] // (len(ret) + len(stm))
        b, max_pages = q.shape[0], cfg.max_pages
        outs, order = [], []
        pages_read, stats_read, selected = self.pages_read, self.stats_read, self.selected
        kw = dict(sink=cfg.sink, local=cfg.local, scale=scale, implementation=impl)
        if ret:
            pool = self.retrieval_pools[layer]
            qi = _query_heads(ret, group)
            qr = q[:, 0, qi]
            sel = None
            if cfg.dynamic_sparsity:
                want = len(ret) * (group if cfg.per_query_head else 1)
                if self.selected[layer].shape[1] != want:
                    raise ValueError(f"LServeCache was built for {self.selected[layer].shape[1] // len(ret)} query "
                                     f"heads per KV head but the model has {group}: pass group= to LServeCache.init")
                sel, rows = self._select(layer, qr, pool, lengths)
                selected = _set(selected, layer, sel)
                n_logical = (lengths + cfg.logical_page_size - 1) // cfg.logical_page_size
                stats_read = stats_read + jnp.where(rows, n_logical * len(ret), 0)
                # Distinct pages per KV head: the union of its query heads' lists.
                head = jnp.arange(len(ret)).repeat(sel.shape[1] // len(ret))[None, :, None]
                touched = jnp.zeros((b, len(ret), max_pages + 1), bool).at[
                    jnp.arange(b)[:, None, None], head, jnp.where(sel >= 0, sel, max_pages)].set(True)
                pages_read = pages_read + jnp.sum(touched[:, :, :max_pages], axis=(1, 2))
            else:
                pages_read = pages_read + (lengths + cfg.page_size - 1) // cfg.page_size * len(ret)
            outs.append(self._paged_decode(qr, pool, lengths, sel, False, kw))
            order.append(qi)
        if stm:
            pool = self.streaming_pools[layer]
            qi = _query_heads(stm, group)
            lists = pallas_kernels.decode_page_lists(pool.page_table, lengths, None, np.ones(len(stm), bool),
                                                     sink=cfg.sink, local=cfg.local, page_size=cfg.page_size)
            pages_read = pages_read + jnp.sum(lists >= 0, axis=(1, 2))
            outs.append(self._paged_decode(q[:, 0, qi], pool, lengths, None, True, kw))
            order.append(qi)
        out = jnp.concatenate(outs, axis=1)[:, np.argsort(np.concatenate(order))][:, None]
        return out, self.replace(selected=selected, pages_read=pages_read, stats_read=stats_read)

    def _paged_decode(self, q, pool, lengths, selected, streaming: bool, kw):
        """`sparse_paged_decode` over one pool (q [B, heads * group, D], every head streaming or none). On a mesh,
        with the pool split by heads (`partition_specs`), it runs per device under `jax.shard_map` (its KV heads,
        their query heads and page lists), so a Pallas kernel is not one custom call that GSPMD can only run whole
        on gathered inputs (see `jaxeff.models.sharding`); a replicated pool runs as is."""
        def run(q, k_pages, v_pages, page_table, lengths, *selected):
            return pallas_kernels.sparse_paged_decode(
                q, k_pages, v_pages, page_table, lengths, selected[0] if selected else None,
                streaming_heads=np.full(k_pages.shape[0], streaming), **kw)

        args = (q, pool.k_pages, pool.v_pages, pool.page_table, lengths) + (() if selected is None else (selected,))
        heads = pool.k_pages.shape[0]
        if self.mesh is None or heads_spec(heads, 0, self.mesh.shape[self.mesh_axis], self.mesh_axis,
                                           by_sequence=False, head_dim=0) == PartitionSpec():
            return run(*args)
        rows, pages, rep = PartitionSpec(None, self.mesh_axis), PartitionSpec(self.mesh_axis), PartitionSpec()
        specs = (rows, pages, pages, rep, rep) + (() if selected is None else (rows,))
        return jax.shard_map(run, mesh=self.mesh, in_specs=specs, out_specs=rows, check_vma=False)(*args)


def _set(items: tuple, i: int, x) -> tuple:
    return items[:i] + (x,) + items[i + 1:]
