"""LServe-style paged KV cache with per-logical-page key statistics, Quest page scores and page selection.

Layout (shared with `sparse_paged_decode`):
- k_pages, v_pages: [Hkv, P, page_size, D], a pool of P physical pages per KV head (jax's paged_attention layout).
- kmin, kmax: [Hkv, P, page_size // logical_page_size, D], element-wise min / max of the keys of each logical page.
- page_table: int32 [B, max_pages]; logical page n of sequence b lives in physical page page_table[b, n].
- lengths: int32 [B], tokens stored per sequence.

Scoring and selection are gathers plus small reductions that XLA fuses; they run as plain XLA on every backend
(a kernel would read the same kmin/kmax bytes); they ran on CPU and, inside the paged-decode device test,
on an NVIDIA H200.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import check_gqa, check_int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Paged KV cache; shapes in the module docstring. A pytree, so it passes through jit and scan."""

    k_pages: jax.Array
    v_pages: jax.Array
    kmin: jax.Array
    kmax: jax.Array
    page_table: jax.Array
    lengths: jax.Array

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    @property
    def logical_page_size(self) -> int:
        return self.page_size // self.kmin.shape[2]

    @property
    def capacity(self) -> int:
        """Tokens per sequence that the page table can address."""
        return self.page_table.shape[1] * self.page_size


def init_paged_kv_cache(batch: int, num_kv_heads: int, head_dim: int, *, max_pages_per_seq: int,
                        page_size: int = 64, logical_page_size: int = 16, num_pages: int | None = None,
                        page_table=None, dtype=jnp.float32) -> PagedKVCache:
    """Empty cache. Without `page_table`, sequence b owns physical pages [b * max_pages, (b + 1) * max_pages)."""
    check_int("page_size", page_size, 1)
    check_int("logical_page_size", logical_page_size, 1)
    if page_size % logical_page_size:
        raise ValueError(f"page_size {page_size} must be a multiple of logical_page_size {logical_page_size}")
    num_pages = batch * max_pages_per_seq if num_pages is None else num_pages
    if page_table is None:
        page_table = np.arange(batch * max_pages_per_seq, dtype=np.int32).reshape(batch, max_pages_per_seq)
    page_table = jnp.asarray(page_table, jnp.int32)
    if page_table.shape != (batch, max_pages_per_seq):
        raise ValueError(f"page_table must have shape ({batch}, {max_pages_per_seq}), got {page_table.shape}")
    check_page_table(page_table, num_pages)
    n_log = page_size // logical_page_size
    pages = jnp.zeros((num_kv_heads, num_pages, page_size, head_dim), dtype)
    return PagedKVCache(
        k_pages=pages, v_pages=pages,
        kmin=jnp.full((num_kv_heads, num_pages, n_log, head_dim), jnp.inf, dtype),
        kmax=jnp.full((num_kv_heads, num_pages, n_log, head_dim), -jnp.inf, dtype),
        page_table=page_table, lengths=jnp.zeros((batch,), jnp.int32),
    )


def _concrete(x) -> np.ndarray | None:
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_page_table(page_table, num_pages: int, lengths=None, page_size: int | None = None) -> None:
    """ValueError if a page-table entry in use is outside [0, num_pages); skipped for traced values."""
    table = _concrete(page_table)
    if table is None:
        return
    if lengths is None:
        used = np.ones(table.shape, bool)
    else:
        lens = _concrete(lengths)
        if lens is None:
            return
        used = np.arange(table.shape[1])[None, :] * page_size < lens[:, None]
    bad = used & ((table < 0) | (table >= num_pages))
    if bad.any():
        b, n = np.argwhere(bad)[0]
        raise ValueError(f"page_table[{b}, {n}] = {table[b, n]} is out of range for a pool of {num_pages} pages")


def append_kv(cache: PagedKVCache, k, v, num_tokens=None) -> PagedKVCache:
    """Appends k, v [B, T, Hkv, D] at each sequence's end and updates the logical-page min/max statistics.

    num_tokens: optional int [B] <= T, how many of the T tokens are real per sequence (ragged prefill).
    """
    b, t, hkv, d = k.shape
    if cache.k_pages.shape[0] != hkv or cache.k_pages.shape[3] != d or cache.page_table.shape[0] != b:
        raise ValueError(f"k {k.shape} does not match the cache (k_pages {cache.k_pages.shape}, batch "
                         f"{cache.page_table.shape[0]})")
    if v.shape != k.shape:
        raise ValueError(f"v {v.shape} must have the shape of k {k.shape}")
    n_new = jnp.full((b,), t, jnp.int32) if num_tokens is None else jnp.asarray(num_tokens, jnp.int32)
    lens, n_conc = _concrete(cache.lengths), _concrete(n_new)
    if lens is not None and n_conc is not None and (lens + n_conc > cache.capacity).any():
        raise ValueError(f"appending {n_conc.tolist()} tokens to lengths {lens.tolist()} exceeds the cache "
                         f"capacity of {cache.capacity} tokens per sequence")
    num_pages, ps, lps = cache.k_pages.shape[1], cache.page_size, cache.logical_page_size
    pos = cache.lengths[:, None] + jnp.arange(t)[None, :]
    valid = jnp.arange(t)[None, :] < n_new[:, None]
    logical = jnp.minimum(pos // ps, cache.page_table.shape[1] - 1)
    phys = jnp.take_along_axis(cache.page_table, logical, axis=1)
    phys = jnp.where(valid, phys, num_pages)  # out of range: dropped by the scatters
    slot = pos % ps
    sub = slot // lps
    kt, vt = k.transpose(2, 0, 1, 3).astype(cache.k_pages.dtype), v.transpose(2, 0, 1, 3).astype(cache.v_pages.dtype)
    k_pages = cache.k_pages.at[:, phys, slot].set(kt, mode="drop")
    v_pages = cache.v_pages.at[:, phys, slot].set(vt, mode="drop")
    # A token that opens a logical page resets its statistics (pages are recycled), then min/max accumulate.
    fresh = jnp.where(slot % lps == 0, phys, num_pages)
    kmin = cache.kmin.at[:, fresh, sub].set(jnp.inf, mode="drop").at[:, phys, sub].min(kt, mode="drop")
    kmax = cache.kmax.at[:, fresh, sub].set(-jnp.inf, mode="drop").at[:, phys, sub].max(kt, mode="drop")
    return dataclasses.replace(cache, k_pages=k_pages, v_pages=v_pages, kmin=kmin, kmax=kmax,
                               lengths=cache.lengths + n_new)


def page_scores(q, kmin, kmax, page_table, lengths, *, logical_page_size: int, per_query_head: bool = True):
    """Quest/LServe page importance for one decode query.

    Args:
      q: [B, Hq, D] decode queries (RoPE applied), Hq % Hkv == 0.
      kmin, kmax: [Hkv, P, page_size // logical_page_size, D].
      page_table: int32 [B, max_pages]; lengths: int32 [B] (the tokens in the cache).
      logical_page_size: tokens per logical page.
      per_query_head: True (official, omniserve `single_query_page_selector`, one score per (sequence, query
        head, logical page)): every query head scores its KV head's pages with its own query. False: one score
        per KV head, the max over the query heads of its GQA group (a deviation; see jaxeff/lserve/README.md).
    Returns:
      float32 [B, Hq, max_pages] (or [B, Hkv, max_pages]): per logical page sum_d max(q_d * kmax_d, q_d * kmin_d)
      in float32 (the official kernel forms fp16 products over 8-dim chunks and reduces them in fp32, so rankings
      can differ at near-ties), max over the logical pages of a physical page (omniserve
      decoding_attention.py:132-133); -inf for pages past the history.
    """
    b, hq, d = q.shape
    hkv, num_pages, n_log, _ = kmin.shape
    g = check_gqa(hq, hkv)
    page_size = n_log * logical_page_size
    check_page_table(page_table, num_pages, lengths, page_size)
    mn = kmin[:, page_table].astype(jnp.float32)  # [Hkv, B, max_pages, n_log, D]
    mx = kmax[:, page_table].astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(b, hkv, g, 1, 1, d)
    mn, mx = mn.transpose(1, 0, 2, 3, 4)[:, :, None], mx.transpose(1, 0, 2, 3, 4)[:, :, None]
    s = jnp.maximum(qg * mx, qg * mn).sum(-1)  # [B, Hkv, G, max_pages, n_log]
    start = (jnp.arange(page_table.shape[1])[:, None] * page_size
             + jnp.arange(n_log)[None, :] * logical_page_size)  # first token of each logical page
    filled = start[None] < lengths[:, None, None]  # [B, max_pages, n_log]
    s = jnp.where(filled[:, None, None], s, -jnp.inf).max(axis=4)  # [B, Hkv, G, max_pages]
    return s.reshape(b, hq, -1) if per_query_head else s.max(axis=2)


MIN_SELECTED_PAGES = 3  # omniserve decoding_attention.py:136-141: max(3, budget // page_size)


def selected_page_count(history: int, *, budget: int, page_size: int) -> int:
    """Pages a decode step reads for a sequence of `history` tokens (the current one included):
    min(max(3, budget // page_size), pages), i.e. every page while they fit, else the newest page plus the
    min(max(3, budget // page_size), pages) - 1 best of the others (omniserve decoding_attention.py:87-143)."""
    return min(max(MIN_SELECTED_PAGES, budget // page_size), -(-history // page_size))


def select_pages(scores, lengths, *, budget: int, page_size: int):
    """Top pages per sequence and head under a token budget (LServe's `dynamic_select_topk_pages`).

    Args:
      scores: float [B, H, max_pages] from `page_scores` (H = query heads, or KV heads for the shared-list
        option); lengths: int32 [B], tokens in the cache including the current one.
      budget: tokens, >= page_size. With n = max(3, budget // page_size) (the official floor of 3 pages, which
        exceeds budgets below 3 pages) and `pages` live pages: every page when pages <= n, else the newest page
        plus the n - 1 best-scoring others. The official code also returns every page at history == budget
        (budget // page_size + 1 pages); here the count never exceeds n.
    Returns:
      int32 [B, H, n] logical page indices in ascending order, -1 in unused slots.
    """
    budget = check_int("budget", budget, page_size)
    k = max(MIN_SELECTED_PAGES, budget // page_size)
    max_pages = scores.shape[-1]
    n_pages = (lengths + page_size - 1) // page_size
    page = jnp.arange(max_pages)
    live = page[None, :] < n_pages[:, None]
    newest = page[None, :] == n_pages[:, None] - 1
    s = jnp.where(newest[:, None], jnp.inf, jnp.where(live[:, None], scores.astype(jnp.float32), -jnp.inf))
    if k > max_pages:  # every page fits: pad so top_k can return k slots
        s = jnp.pad(s, ((0, 0), (0, 0), (0, k - max_pages)), constant_values=-jnp.inf)
    # Live pages always score finite (their first logical page holds a token); -inf marks empty slots.
    top_s, top_i = jax.lax.top_k(s, k)
    sel = jnp.sort(jnp.where(top_s > -jnp.inf, top_i, max_pages), axis=-1)
    return jnp.where(sel == max_pages, -1, sel).astype(jnp.int32)
