"""DuoAttention (mit-han-lab/duo-attention) on the shared Llama/Mistral/Qwen2 decoder.

- `train_gates`: retrieval-head identification with the official two-way forward (decoder frozen, gates only).
- `load_pattern` / `save_pattern`: the official `full_attention_heads.tsv` + `config.json` format, from a directory
  or a released pattern by name (`RELEASED_PATTERNS`, `resolve_pattern`);
  `select_retrieval_heads`: the quantile rule; `kv_cache_ratio`: the paper's memory formula.
- `DualKVCache` and `generate`: full KV for retrieval heads, sink + recent for streaming heads, chunked prefill
  with streaming heads sparse from the first chunk.
"""

from jaxeff.duo_attention.cache import DualKVCache, DuoGenerateOutput, generate
from jaxeff.duo_attention.pattern import (
    RELEASED_PATTERNS,
    check_pattern,
    kv_cache_ratio,
    load_pattern,
    resolve_pattern,
    save_pattern,
    select_retrieval_heads,
)
from jaxeff.duo_attention.training import (
    GateTrainConfig,
    gate_loss,
    gate_schedule,
    make_gate_step,
    train_gates,
    two_way_attention_fn,
)

__all__ = [
    "RELEASED_PATTERNS", "DualKVCache", "DuoGenerateOutput", "GateTrainConfig", "check_pattern", "gate_loss",
    "gate_schedule", "generate", "kv_cache_ratio", "load_pattern", "make_gate_step", "resolve_pattern", "save_pattern",
    "select_retrieval_heads", "train_gates", "two_way_attention_fn",
]
