"""LongVILA MM-SP: multi-modal sequence parallelism (2D Ulysses x ring attention) with `jax.shard_map`.

- `sequence_parallel_attention` (global arrays) / `sp_attention_local` (inside `shard_map`): 2D attention.
- `layout`: the zigzag partition valid for any Ulysses degree, padding multiples, causal work per device.
- `vlm`: the tiny video VLM and its MM-SP loss (stage-1 frame sharding, stage-2 token re-shard).
- `comm`: collective bytes from compiled HLO and the analytic formula. `niah`: synthetic video NIAH data.

Exact by design where the official code is not: the 2D attention is exact for every (ring, Ulysses), unlike the
official hybrid zigzag layout with ring > 1 and Ulysses > 1, and the loss equals the unsharded loss, unlike the
official shard-local label shift. See README.md in this package.
"""

from jaxeff.longvila.attention import (
    ring_attention_local,
    sequence_parallel_attention,
    sp_attention_local,
)
from jaxeff.longvila.layout import causal_work, padded_length, zigzag_permutation

__all__ = [
    "causal_work",
    "padded_length",
    "ring_attention_local",
    "sequence_parallel_attention",
    "sp_attention_local",
    "zigzag_permutation",
]
