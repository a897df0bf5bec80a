"""Pallas kernels behind DuoAttention and LServe, each with a plain-JAX reference and one dispatch point.

- `hybrid_attention`: causal attention with DuoAttention streaming (sink + local) KV heads, block-sparse.
- `PagedKVCache` / `init_paged_kv_cache` / `append_kv`: LServe's paged KV cache with per-logical-page key min/max.
- `page_scores` / `select_pages`: Quest-style page importance and top-budget page selection.
- `sparse_paged_decode`: one decode step, dense heads over selected pages, streaming heads over sink + local.
- `channel_rms_norm`: DC-AE's channel RMS norm (weight, bias) fused with the residual add; `glu_silu`: its GLU gate.
- `gather_matmul`: SparseRefine's sparse convolution, out[m] = sum_k F[table[m, k]] @ W[k].
"""

from pallas_kernels.channel_norm import channel_rms_norm, channel_rms_norm_reference, glu_silu, glu_silu_reference
from pallas_kernels.hybrid_attention import (
    hybrid_attention,
    hybrid_attention_block_count,
    hybrid_attention_reference,
)
from pallas_kernels.paged import PagedKVCache, append_kv, init_paged_kv_cache, page_scores, select_pages
from pallas_kernels.sparse_conv import gather_matmul, gather_matmul_reference
from pallas_kernels.sparse_decode import decode_page_lists, sparse_paged_decode, sparse_paged_decode_reference

__all__ = [
    "PagedKVCache",
    "append_kv",
    "channel_rms_norm",
    "channel_rms_norm_reference",
    "decode_page_lists",
    "gather_matmul",
    "gather_matmul_reference",
    "glu_silu",
    "glu_silu_reference",
    "hybrid_attention",
    "hybrid_attention_block_count",
    "hybrid_attention_reference",
    "init_paged_kv_cache",
    "page_scores",
    "select_pages",
    "sparse_paged_decode",
    "sparse_paged_decode_reference",
]
