"""Passkey prompts for generation-based evaluation, with the character tokenizer or a model's own tokenizer.

The examples are `jaxeff.data.PasskeyTask`'s (English haystack, needle at a depth, question at the end); a prompt
stops right before the key and a prediction is correct when the generated text starts with the key digits.
`check_model_and_pattern` / `resolve_model`: the model and pattern arguments of the passkey experiments
(`duo_attention_passkey`, `lserve_needle`), checked up front and resolved to a model directory: by default the
`llama_passkey` export both share in `checkpoints/`, taken only while its stamp (`passkey_stamp`) matches the
current preset.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxeff.checks import require_int
from jaxeff.data import PasskeyTask, english_corpus
from jaxeff.data.passkey import QUESTION
from jaxeff.duo_attention.pattern import is_pattern_name, parse_pattern_name
from jaxeff.experiment import Run, config_differences, get, make_config, run_experiment


def passkey_export_dir(preset: str) -> str:
    """Where `llama_passkey` exports its model for `preset` when its `export_dir` is left empty (relative to the
    working directory): the one definition the experiment and `resolve_model` share."""
    return f"checkpoints/llama_passkey_{preset}"


# the default exports `resolve_model` looks in (full first) when no model is given
PASSKEY_CHECKPOINTS = {preset: passkey_export_dir(preset) for preset in ("full", "smoke")}

# `llama_passkey` config fields that do not change the exported model (how often and on what it is evaluated or
# checkpointed during training, where it is exported, a simulated preemption); every other field, including one
# added later, does (`eval_contexts` too: it sets max_position_embeddings), and a difference in it retrains.
NOT_MODEL_FIELDS = ("checkpoint_every", "eval_every", "eval_examples", "export_dir", "interrupt_at_step")


def load_tokenizer(model_dir: str | Path):
    """The Hugging Face tokenizer stored with a model (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def passkey_prompts(context: int, n: int, *, seed: int = 12345, depth: float | None = None, tokenizer=None,
                    key_digits: int = 5) -> tuple[list[list[int]], list[str]]:
    """(prompt token lists, keys). context counts characters of the char task (`PasskeyTask` examples); with a
    Hugging Face `tokenizer` it counts about that many of its tokens: the same needle and question around a
    haystack of the same English text (repeated for contexts longer than the corpus), sized by the tokenizer's
    characters per token. ValueError for n or key_digits < 1 or a context too short for the needle and question."""
    context, n = require_int(context, "context", 1), require_int(n, "n (prompts)", 1)
    key_digits = require_int(key_digits, "key_digits", 1)
    if tokenizer is None:
        task = PasskeyTask(context=context, key_digits=key_digits)
        batch = task.batch(seed, np.arange(n), depth=depth)
        prompts = [row[: context - key_digits].tolist() for row in batch["tokens"]]
        keys = [task.tokenizer.decode(row[context - key_digits:]) for row in batch["tokens"]]
        return prompts, keys
    task = PasskeyTask(key_digits=key_digits)
    corpus = english_corpus()
    sample = corpus[:20000]
    chars_per_token = len(sample) / len(tokenizer.encode(sample, add_special_tokens=False))
    hay_len = int(context * chars_per_token * 0.97) - len(task.needle("0" * key_digits)) - len(QUESTION)
    if hay_len < 1:
        raise ValueError(f"context {context} (tokens) leaves no room for a haystack around the needle and question")
    reps = -(-(hay_len + len(corpus)) // len(corpus))  # long contexts repeat the corpus
    text = corpus * reps
    prompts, keys = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        key = str(rng.integers(1, 10)) + "".join(str(d) for d in rng.integers(0, 10, key_digits - 1))
        start = int(rng.integers(0, len(corpus)))
        hay = text[start: start + hay_len]
        cut = int(round((rng.uniform(task.min_depth, task.max_depth) if depth is None else depth) * hay_len))
        prompt = hay[:cut] + task.needle(key) + hay[cut:] + QUESTION.rstrip()
        prompts.append(list(tokenizer.encode(prompt, add_special_tokens=True)))
        keys.append(key)
    return prompts, keys


def key_matches(generated: np.ndarray, keys: Sequence[str], tokenizer=None) -> np.ndarray:
    """Bool [B]: the generated text (leading spaces stripped) starts with the key. ValueError unless there is one
    key per generated row."""
    if len(generated) != len(keys):
        raise ValueError(f"{len(generated)} generated rows but {len(keys)} keys: one key per row")
    if tokenizer is None:
        tokenizer = PasskeyTask().tokenizer
    texts = [tokenizer.decode([int(t) for t in row]).lstrip() for row in generated]
    return np.array([t.startswith(k) for t, k in zip(texts, keys)])


def check_model_and_pattern(model: str, pattern: str, require_model: bool) -> None:
    """Config validation of the passkey experiments (`duo_attention_passkey`, `lserve_needle`): `model` must be a
    Hugging Face model directory and `pattern` a pattern directory or a well-formed `hf:`/`github:` name (see
    `jaxeff.duo_attention.load_pattern`), both checked before a run directory is made; `require_model`: both given."""
    if require_model and not (model and pattern):
        raise ValueError("this preset needs model=/path/to/hf_model and pattern=/path/to/duo_attn_pattern")
    if model and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"model={model}: not a Hugging Face model directory (no config.json)")
    if is_pattern_name(pattern):
        parse_pattern_name(pattern)  # a malformed name fails here; the download happens in the run
    elif pattern and not (Path(pattern) / "full_attention_heads.tsv").is_file():
        raise FileNotFoundError(f"pattern={pattern}: no full_attention_heads.tsv")


def passkey_stamp(model_dir: str | Path) -> dict | None:
    """The stamp `llama_passkey` writes beside an export (experiments/llama_passkey.py `export_model`): the training
    run's config.json (experiment, preset, config) and its directory ("run"); None when there is none (another
    model, an export from code older than the stamp, or an interrupted one)."""
    try:
        return json.loads((Path(model_dir) / "passkey_task.json").read_text())
    except (OSError, ValueError):
        return None


def _stale(path: str, preset: str) -> str | None:
    """Why the export at `path` is not the model `llama_passkey` preset `preset` trains today (None: it is); fields
    in `NOT_MODEL_FIELDS` are not compared."""
    stamp = passkey_stamp(path)
    if not isinstance(stamp, dict) or not isinstance(stamp.get("config"), dict):
        return "carries no stamp of the run that made it (older code, or an interrupted export)"
    if (stamp.get("experiment"), stamp.get("preset")) != ("llama_passkey", preset):
        return f"was made by {stamp.get('experiment')} preset {stamp.get('preset')}"
    changed = config_differences(stamp["config"], make_config(get("llama_passkey"), preset, {}),
                                 ignore=NOT_MODEL_FIELDS)
    return f"was trained with a config other than today's {preset} preset ({'; '.join(changed)})" if changed else None


def resolve_model(cfg_model: str, run: Run) -> tuple[str, str]:
    """(model directory, note for results.md): `cfg_model` when given, else the `llama_passkey` export in
    `PASSKEY_CHECKPOINTS` (relative to the working directory; full preset first) whose stamp says it was trained
    with today's config of that preset, else a fresh `llama_passkey` smoke training (its own run under the same runs
    root) exported to `PASSKEY_CHECKPOINTS["smoke"]`, where the next passkey experiment finds it. An export that
    does not match (no stamp, another config) is retrained over, and the note says why."""
    if cfg_model:
        return cfg_model, f"model `{cfg_model}`"
    rejected = []
    for preset, path in PASSKEY_CHECKPOINTS.items():
        if not (Path(path) / "config.json").is_file():
            continue
        why = _stale(path, preset)
        if why is None:
            return path, f"model `{path}` (llama_passkey {preset}, trained in `{passkey_stamp(path)['run']}`)"
        rejected.append(f"`{path}` {why}")
    base = run_experiment("llama_passkey", "smoke", runs_root=run.dir.parent.parent)  # default export_dir
    export = PASSKEY_CHECKPOINTS["smoke"]
    return export, (f"{'; '.join(rejected) or 'no llama_passkey export existed'}, so `llama_passkey` (smoke) was "
                    f"trained first ({base.dir}) and exported to `{export}`, where the other passkey experiment "
                    f"finds it; its accuracy bounds everything below")
