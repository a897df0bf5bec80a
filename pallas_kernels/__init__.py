"""Pallas kernels behind DuoAttention and LServe, each with a plain-JAX reference and one dispatch point.

- `hybrid_attention`: causal attention with DuoAttention streaming (sink + local) KV heads, block-sparse.
- `PagedKVCache` / `init_paged_kv_cache` / `append_kv`: LServe's paged KV cache with per-logical-page key min/max.
- `page_scores` / `select_pages`: Quest-style page importance and top-budget page selection.
- `sparse_paged_decode`: one decode step, dense heads over selected pages, streaming heads over sink + local.
"""

from pallas_kernels.hybrid_attention import (
    hybrid_attention,
    hybrid_attention_block_count,
    hybrid_attention_reference,
)
from pallas_kernels.paged import PagedKVCache, append_kv, init_paged_kv_cache, page_scores, select_pages
from pallas_kernels.sparse_decode import decode_page_lists, sparse_paged_decode, sparse_paged_decode_reference

__all__ = [
    "PagedKVCache",
    "append_kv",
    "decode_page_lists",
    "hybrid_attention",
    "hybrid_attention_block_count",
    "hybrid_attention_reference",
    "init_paged_kv_cache",
    "page_scores",
    "select_pages",
    "sparse_paged_decode",
    "sparse_paged_decode_reference",
]
