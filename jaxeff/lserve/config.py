"""LServe engine settings (defaults: the official `omniserve` LServe benchmark scripts)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LServeConfig:
    max_len: int = 8192  # tokens per sequence the cache holds (prompt + generated)
    page_size: int = 64  # physical page
    logical_page_size: int = 16  # granularity of the key min/max statistics
    token_budget: int = 4096  # tokens a retrieval head reads per decode step (pages = budget // page_size)
    reselect_every: int = 4  # decode steps a page selection is reused
    sink: int = 128  # streaming heads: attention-sink tokens
    local: int = 256  # streaming heads: recent window (prefill and decode)
    prefill_chunk: int = 32000
    dynamic_sparsity: bool = True  # False: retrieval heads read every page (dense decode)
    implementation: str | None = None  # kernels: None (Pallas on GPU/TPU, XLA on CPU), "pallas", "xla"

    def __post_init__(self):
        for name in ("max_len", "page_size", "logical_page_size", "reselect_every", "local", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"LServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.sink < 0:
            raise ValueError(f"LServeConfig.sink must be >= 0, got {self.sink}")
        if self.page_size % self.logical_page_size:
            raise ValueError(f"page_size {self.page_size} must be a multiple of logical_page_size "
                             f"{self.logical_page_size}")
        if self.token_budget < self.page_size:
            raise ValueError(f"token_budget {self.token_budget} is smaller than one page ({self.page_size} tokens)")
        if self.implementation not in (None, "pallas", "xla"):
            raise ValueError(f"implementation must be None, 'pallas' or 'xla', got {self.implementation!r}")

    @property
    def max_pages(self) -> int:
        return -(-self.max_len // self.page_size)
