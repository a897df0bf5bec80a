"""LServe (mit-han-lab/omniserve): long-context serving with static (DuoAttention streaming heads) and dynamic
(Quest-style page selection under a token budget) sparsity, on the shared decoder and `pallas_kernels`."""

from jaxeff.lserve.cache import LServeCache, ring_page_table, streaming_pages
from jaxeff.lserve.config import LServeConfig
from jaxeff.lserve.engine import Engine, LServeOutput

__all__ = ["Engine", "LServeCache", "LServeConfig", "LServeOutput", "ring_page_table", "streaming_pages"]
