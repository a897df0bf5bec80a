"""LServe engine settings. Defaults: omniserve's `EngineArgs` (omniserve/engine/arg_utils.py:82-94) and its LServe
benchmark scripts; see jaxeff/lserve/README.md for each choice and the options that deviate."""

from __future__ import annotations

import dataclasses

from pallas_kernels.paged import MIN_SELECTED_PAGES


@dataclasses.dataclass(frozen=True)
class LServeConfig:
    max_len: int = 8192  # tokens per sequence the cache holds (prompt + generated)
    page_size: int = 64  # physical page (`cache_block_size`)
    logical_page_size: int = 16  # granularity of the key min/max statistics (64 / `sub_chunk_per_block`)
    token_budget: int = 4096  # tokens a retrieval query head reads per decode step (`dynamic_sparse_token_budget`)
    reselect_every: int = 4  # reselect when the history length % this == 0 (`selector_update_interval`)
    sink: int = 128  # streaming heads in decode: attention-sink tokens (`dec_sink_token`)
    local: int = 256  # streaming heads in decode: recent tokens, the current one included (`dec_local_token`)
    prefill_sink: int = 128  # streaming heads in a sparse prefill (`ctx_sink_token`)
    prefill_local: int = 8192  # streaming heads in a sparse prefill (`ctx_local_token`)
    sparse_prefill: bool = False  # `sparse_context_mode`: False = every head dense in prefill (EngineArgs default)
    per_query_head: bool = True  # page lists per query head (official); False: one list per KV head (deviation)
    prefill_chunk: int = 32000  # tokens per prefill call (`chunk_prefill_size`; here attention is chunked too)
    dynamic_sparsity: bool = True  # False: retrieval heads read every page (dense decode)
    implementation: str | None = None  # kernels: None (Pallas/cuDNN on GPU, Pallas on TPU, XLA on CPU), "pallas", "xla"

    def __post_init__(self):
        for name in ("max_len", "page_size", "logical_page_size", "reselect_every", "local", "prefill_local",
                     "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"LServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sink", "prefill_sink"):
            if getattr(self, name) < 0:
                raise ValueError(f"LServeConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.page_size % self.logical_page_size:
            raise ValueError(f"page_size {self.page_size} must be a multiple of logical_page_size "
                             f"{self.logical_page_size}")
        if self.token_budget < MIN_SELECTED_PAGES * self.page_size or self.token_budget % self.page_size:
            raise ValueError(f"token_budget {self.token_budget} must be a multiple of page_size {self.page_size} "
                             f"and at least {MIN_SELECTED_PAGES} pages (the official selector never reads fewer "
                             f"than {MIN_SELECTED_PAGES} pages, so a smaller budget would be exceeded)")
        if self.page_size % self.reselect_every:
            raise ValueError(f"page_size {self.page_size} must be a multiple of reselect_every "
                             f"{self.reselect_every}, so that every newly opened page triggers a reselection")
        if self.implementation not in (None, "pallas", "xla"):
            raise ValueError(f"implementation must be None, 'pallas' or 'xla', got {self.implementation!r}")

    @property
    def max_pages(self) -> int:
        return -(-self.max_len // self.page_size)
