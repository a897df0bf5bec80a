"""DuoAttention head patterns in the official format, head selection and the KV-cache size formula.

A pattern directory holds `full_attention_heads.tsv` (tab-separated [layers x KV heads] gate values alpha, written
by `np.savetxt`, raw values that may fall slightly outside [0, 1]) and `config.json` (the identification run's
arguments, among them `sink_size` and `recent_size`). The released patterns of mit-han-lab/duo-attention load
unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TSV_NAME = "full_attention_heads.tsv"
CONFIG_NAME = "config.json"


def load_pattern(directory: str | Path) -> tuple[np.ndarray, int, int]:
    """Returns (alpha float32 [layers, kv_heads] clipped to [0, 1], sink_size, recent_size)."""
    directory = Path(directory)
    tsv, cfg_path = directory / TSV_NAME, directory / CONFIG_NAME
    for path in (tsv, cfg_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a DuoAttention pattern directory: {path.name} is missing")
    alpha = np.loadtxt(tsv, dtype=np.float64, delimiter="\t", ndmin=2)
    if not np.isfinite(alpha).all():
        raise ValueError(f"{tsv} holds non-finite gate values")
    cfg = json.loads(cfg_path.read_text())
    missing = [k for k in ("sink_size", "recent_size") if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_path} lacks {missing}")
    return np.clip(alpha, 0.0, 1.0).astype(np.float32), int(cfg["sink_size"]), int(cfg["recent_size"])


def save_pattern(directory: str | Path, alpha, sink_size: int, recent_size: int, **config) -> Path:
    """Writes the official format; `config` adds training arguments (lr, num_steps, ...) to config.json."""
    alpha = np.asarray(alpha, np.float64)
    if alpha.ndim != 2:
        raise ValueError(f"alpha must be [layers, kv_heads], got shape {alpha.shape}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.savetxt(directory / TSV_NAME, alpha, delimiter="\t")
    cfg = dict(config, sink_size=int(sink_size), recent_size=int(recent_size))
    (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return directory


def check_pattern(alpha, num_layers: int, num_kv_heads: int) -> np.ndarray:
    """ValueError unless alpha is [num_layers, num_kv_heads] (a pattern made for another model)."""
    alpha = np.asarray(alpha)
    if alpha.shape != (num_layers, num_kv_heads):
        raise ValueError(f"attention pattern has shape {alpha.shape} but the model has {num_layers} layers x "
                         f"{num_kv_heads} KV heads: the pattern belongs to another model")
    return alpha


def select_retrieval_heads(alpha, sparsity: float, *, seed: int = 0) -> np.ndarray:
    """Bool [layers, kv_heads]: retrieval heads are alpha >= quantile(alpha, sparsity) (the official rule), with
    ties broken by tiny noise so that exactly round((1 - sparsity) * n) heads are kept when alphas repeat."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    alpha = np.asarray(alpha, np.float64)
    if sparsity == 0.0:
        return np.ones(alpha.shape, bool)
    if sparsity == 1.0:
        return np.zeros(alpha.shape, bool)
    noisy = alpha + np.random.default_rng(seed).uniform(0, 1e-6, alpha.shape)
    return noisy >= np.quantile(noisy, sparsity)


def kv_cache_ratio(retrieval_fraction: float, sink: int, recent: int, context: int) -> float:
    """The paper's KV-cache size relative to dense: r + (1 - r) * min(sink + recent, L) / L."""
    r = float(retrieval_fraction)
    return r + (1 - r) * min(sink + recent, context) / context
