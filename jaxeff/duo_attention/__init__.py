"""DuoAttention (mit-han-lab/duo-attention) on the shared Llama/Mistral/Qwen2 decoder.

- `train_gates`: retrieval-head identification with the official two-way forward (decoder frozen, gates only),
  the official block-granular streaming mask, LR schedule and clamping by default (`GateTrainConfig`);
  `MultiPasskeyData`: the official calibration data (multi-passkey in long text) for any tokenizer.
- `load_pattern` / `save_pattern`: the official `full_attention_heads.tsv` + `config.json` format, from a directory
  or a released pattern by name (`RELEASED_PATTERNS`, `resolve_pattern`);
  `select_retrieval_heads`: the quantile rule with the official tie-breaking noise (seeded), `selection_ties`;
  `kv_cache_ratio`: the paper's memory formula; `check_head_mask`: the bool head split `generate` and LServe
  take (gate values alpha refused by name).
- `DualKVCache` and `generate`: full KV for retrieval heads, sink + recent for streaming heads; the official
  deployment window (first chunk dense, later chunks [sink + recent; chunk], decode sink + recent + 1) or the
  token-exact one, and the official evaluation protocols (`PROTOCOLS`: "longbench", "niah", "efficiency").
"""

from jaxeff.duo_attention.cache import PROTOCOLS, DualKVCache, DuoGenerateOutput, generate
from jaxeff.duo_attention.calibration import CalibrationConfig, MultiPasskeyData
from jaxeff.duo_attention.pattern import (
    RELEASED_PATTERNS,
    check_head_mask,
    check_pattern,
    kv_cache_ratio,
    load_pattern,
    resolve_pattern,
    save_pattern,
    select_retrieval_heads,
    selection_ties,
)
from jaxeff.duo_attention.training import (
    GateTrainConfig,
    gate_loss,
    gate_schedule,
    make_gate_step,
    torch_abs,
    torch_clamp01,
    train_gates,
    two_way_attention_fn,
)

__all__ = [
    "PROTOCOLS", "RELEASED_PATTERNS", "CalibrationConfig", "DualKVCache", "DuoGenerateOutput", "GateTrainConfig",
    "MultiPasskeyData", "check_head_mask", "check_pattern", "gate_loss", "gate_schedule", "generate",
    "kv_cache_ratio", "load_pattern", "make_gate_step", "resolve_pattern", "save_pattern", "select_retrieval_heads",
    "selection_ties", "torch_abs", "torch_clamp01", "train_gates", "two_way_attention_fn",
]
