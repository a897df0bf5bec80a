"""LongVILA MM-SP: multi-modal sequence parallelism (2D Ulysses x ring attention) with `jax.shard_map`."""

from jaxeff.longvila.attention import (
    reference_attention,
    ring_attention_local,
    sequence_parallel_attention,
    sp_attention_local,
)
from jaxeff.longvila.layout import causal_work, padded_length, zigzag_permutation

__all__ = [
    "causal_work",
    "padded_length",
    "reference_attention",
    "ring_attention_local",
    "sequence_parallel_attention",
    "sp_attention_local",
    "zigzag_permutation",
]
