"""LServe's paged KV cache: separate page pools for retrieval and streaming KV heads, as a decoder cache.

Per layer, the retrieval heads own a `pallas_kernels.PagedKVCache` (every logical page of a sequence has its own
physical page; keys carry per-logical-page min/max statistics) and the streaming heads own a small pool holding
their sink pages and a ring of local pages: the streaming page table maps logical page n >= n_sink to ring slot
(n - n_sink) % n_ring, so a streaming head stores O(sink + local) tokens whatever the context.

`attend` has two static modes:
- prefill (`prefill_offset` = position of the chunk's first token, the same for every row): the prefix is gathered
  from both pools and the chunk goes through one `pallas_kernels.hybrid_attention` call in which retrieval heads
  are dense and streaming heads Λ-shaped (block-sparse); then the chunk is appended to both pools (only the
  tokens a streaming head keeps go to its ring, so no two writes hit the same slot).
- decode (`prefill_offset` = -1): append the token, (re)select pages for retrieval heads with the Quest score when
  `reselect` is set and reuse the selection otherwise, always adding the newest page, then
  `pallas_kernels.sparse_paged_decode` on each pool. Counters record the KV pages and statistics entries read.
Executed on CPU only (XLA paths of the kernels).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import pallas_kernels
from jaxeff.lserve.config import LServeConfig


def _query_heads(kv_heads, group: int) -> np.ndarray:
    return np.asarray([h * group + j for h in kv_heads for j in range(group)], np.int32)


def streaming_pages(cfg: LServeConfig) -> tuple[int, int]:
    """(sink pages, ring pages) of a streaming head; the ring covers every local page a decode step reads."""
    n_sink = -(-cfg.sink // cfg.page_size)
    n_ring = (cfg.local - 1) // cfg.page_size + 2
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


@struct.dataclass
class LServeCache:
    retrieval_pools: tuple  # per layer PagedKVCache over the layer's retrieval heads
    streaming_pools: tuple  # per layer PagedKVCache over its streaming heads (ring page table)
    selected: tuple  # per layer int32 [B, n_retrieval, budget // page_size]: the reused page selection
    reselect: jnp.ndarray  # bool []: select pages at this decode step
    pages_read: jnp.ndarray  # int32 [B]: KV pages (one head's page) read by decode steps so far
    stats_read: jnp.ndarray  # int32 [B]: logical-page min/max entries (one head's) read by page selection
    retrieval: tuple = struct.field(pytree_node=False)
    streaming: tuple = struct.field(pytree_node=False)
    config: LServeConfig = struct.field(pytree_node=False)
    prefill_offset: int = struct.field(pytree_node=False, default=-1)

    @classmethod
    def init(cls, streaming_heads, batch: int, head_dim: int, config: LServeConfig, dtype=jnp.float32):
        """streaming_heads: bool [layers, kv_heads]."""
        mask = np.asarray(streaming_heads, bool)
        ps, max_pages = config.page_size, config.max_pages
        n_sink, n_ring = streaming_pages(config)
        ret = tuple(tuple(int(h) for h in np.flatnonzero(~row)) for row in mask)
        stm = tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in mask)
        ring = ring_page_table(batch, max_pages, n_sink, n_ring)
        kw = dict(page_size=ps, logical_page_size=config.logical_page_size, dtype=dtype)
        n_sel = config.token_budget // ps
        return cls(
            retrieval_pools=tuple(pallas_kernels.init_paged_kv_cache(batch, len(r), head_dim,
                                                                     max_pages_per_seq=max_pages, **kw) for r in ret),
            streaming_pools=tuple(pallas_kernels.init_paged_kv_cache(
                batch, len(s), head_dim, max_pages_per_seq=max_pages, num_pages=batch * (n_sink + n_ring),
                page_table=ring, **kw) for s in stm),
            selected=tuple(jnp.full((batch, len(r), n_sel), -1, jnp.int32) for r in ret),
            reselect=jnp.asarray(True), pages_read=jnp.zeros((batch,), jnp.int32),
            stats_read=jnp.zeros((batch,), jnp.int32), retrieval=ret, streaming=stm, config=config,
        )

    @property
    def lengths(self) -> jnp.ndarray:
        return self.retrieval_pools[0].lengths if self.retrieval[0] else self.streaming_pools[0].lengths

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
        n_sink, n_ring = streaming_pages(cfg)
        if self.prefill_offset >= 0:
            out = self._prefill(layer, q, k, v, scale, impl)
        if ret:
            rp = pallas_kernels.append_kv(rp, k[:, :, ret], v[:, :, ret], n_new)
        if stm:
            sp = _append_ring(sp, k[:, :, stm], v[:, :, stm], n_new, n_sink, n_ring)
        cache = self.replace(retrieval_pools=_set(self.retrieval_pools, layer, rp),
                             streaming_pools=_set(self.streaming_pools, layer, sp))
        if self.prefill_offset >= 0:
            return out, cache
        return cache._decode(layer, q, scale, impl)

    def _prefill(self, layer, q, k, v, scale, impl):
        off = self.prefill_offset
        ret, stm = self.retrieval[layer], self.streaming[layer]
        if off:
            parts = [_gather_prefix(pools[layer], off) for pools, heads in
                     ((self.retrieval_pools, ret), (self.streaming_pools, stm)) if heads]
            inv = np.argsort(np.asarray(ret + stm))
            pk = jnp.concatenate([p[0] for p in parts], axis=2)[:, :, inv].astype(k.dtype)
            pv = jnp.concatenate([p[1] for p in parts], axis=2)[:, :, inv].astype(v.dtype)
            k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
        flags = np.zeros(k.shape[2], bool)
        flags[list(stm)] = True
        return pallas_kernels.hybrid_attention(q, k, v, streaming_heads=flags, sink=self.config.sink,
                                               local=self.config.local, q_offset=off, scale=scale,
                                               implementation=impl)

    def _decode(self, layer, q, scale, impl):
        cfg = self.config
        ret, stm = self.retrieval[layer], self.streaming[layer]
        group = q.shape[2] // (len(ret) + len(stm))
        lengths = self.lengths
        b = q.shape[0]
        outs, order = [], []
        pages_read, stats_read, selected = self.pages_read, self.stats_read, self.selected
        kw = dict(sink=cfg.sink, local=cfg.local, scale=scale, implementation=impl)
        if ret:
            pool = self.retrieval_pools[layer]
            qi = _query_heads(ret, group)
            qr = q[:, 0, qi]
            sel = None
            if cfg.dynamic_sparsity:
                def choose():
                    scores = pallas_kernels.page_scores(qr, pool.kmin, pool.kmax, pool.page_table, lengths,
                                                        logical_page_size=cfg.logical_page_size)
                    return pallas_kernels.select_pages(scores, lengths, budget=cfg.token_budget,
                                                       page_size=cfg.page_size)

                stored = jax.lax.cond(self.reselect, choose, lambda: self.selected[layer])
                selected = _set(selected, layer, stored)
                # A page opened since the last selection is always read.
                newest = jnp.broadcast_to(((lengths - 1) // cfg.page_size)[:, None, None], (b, len(ret), 1))
                extra = jnp.where((stored == newest).any(-1, keepdims=True), -1, newest)
                sel = jnp.concatenate([stored, extra], axis=-1)
                n_logical = (lengths + cfg.logical_page_size - 1) // cfg.logical_page_size
                stats_read = stats_read + jnp.where(self.reselect, n_logical * len(ret), 0)
                pages_read = pages_read + jnp.sum(sel >= 0, axis=(1, 2))
            else:
                pages_read = pages_read + (lengths + cfg.page_size - 1) // cfg.page_size * len(ret)
            outs.append(pallas_kernels.sparse_paged_decode(qr, pool.k_pages, pool.v_pages, pool.page_table, lengths,
                                                           sel, streaming_heads=np.zeros(len(ret), bool), **kw))
            order.append(qi)
        if stm:
            pool = self.streaming_pools[layer]
            qi = _query_heads(stm, group)
            lists = pallas_kernels.decode_page_lists(pool.page_table, lengths, None, np.ones(len(stm), bool),
                                                     sink=cfg.sink, local=cfg.local, page_size=cfg.page_size)
            pages_read = pages_read + jnp.sum(lists >= 0, axis=(1, 2))
            outs.append(pallas_kernels.sparse_paged_decode(q[:, 0, qi], pool.k_pages, pool.v_pages, pool.page_table,
                                                           lengths, None, streaming_heads=np.ones(len(stm), bool),
                                                           **kw))
            order.append(qi)
        out = jnp.concatenate(outs, axis=1)[:, np.argsort(np.concatenate(order))][:, None]
        return out, self.replace(selected=selected, pages_read=pages_read, stats_read=stats_read)


def _set(items: tuple, i: int, x) -> tuple:
    return items[:i] + (x,) + items[i + 1:]
