"""DuoAttention head patterns in the official format, head selection and the KV-cache size formula.

A pattern directory holds `full_attention_heads.tsv` (tab-separated [layers x KV heads] gate values alpha, written
by `np.savetxt`, raw values that may fall slightly outside [0, 1]) and `config.json` (the identification run's
arguments, among them `sink_size` and `recent_size`). The released patterns of mit-han-lab/duo-attention load
unchanged, from a local directory or by name (`RELEASED_PATTERNS`, downloaded once into a cache directory):

    load_pattern("github:mit-han-lab/duo-attention/attn_patterns/<model>/<run>")   # raw files from GitHub
    load_pattern("hf:<owner>/<repo>@<revision>/<folder>")                          # a Hugging Face model repo
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np

from jaxeff.checks import require_int, require_number
from jaxeff.io import hub

TSV_NAME = "full_attention_heads.tsv"
CONFIG_NAME = "config.json"
_OFFICIAL = "github:mit-han-lab/duo-attention/attn_patterns"
# The patterns released in mit-han-lab/duo-attention (attn_patterns/<model>/<identification run>).
RELEASED_PATTERNS = {
    model: f"{_OFFICIAL}/{model}/lr=0.02-reg=0.05-ctx=1000_{ctx}-multi_passkey10"
    for model, ctx in [("Llama-2-7B-32K-Instruct", 32000), ("Llama-3-8B-Instruct-Gradient-1048k", 32000),
                       ("Llama-3-8B-Instruct-Gradient-4194k", 32000), ("Meta-Llama-3.1-8B-Instruct", 128000),
                       ("Mistral-7B-Instruct-v0.2", 32000), ("Mistral-7B-Instruct-v0.3", 32000)]
}


def is_pattern_name(source: str | Path) -> bool:
    """True for an `hf:` / `github:` name (downloaded by `resolve_pattern`), False for a local path."""
    return isinstance(source, str) and source.startswith(("hf:", "github:"))


def parse_pattern_name(name: str) -> tuple[str, str, str | None, str]:
    """`"hf:owner/repo[@rev]/folder"` or `"github:owner/repo[@ref]/folder"` -> (kind, "owner/repo", rev, folder).

    rev is None when not given (GitHub: the `main` branch; Hugging Face: the repo's default revision)."""
    kind, _, rest = name.partition(":")
    parts = rest.strip("/").split("/", 2)
    if kind not in ("hf", "github") or len(parts) < 3 or not all(parts):
        raise ValueError(f"pattern name {name!r} is not 'hf:<owner>/<repo>[@<revision>]/<folder>' or "
                         f"'github:<owner>/<repo>[@<ref>]/<folder>'")
    owner, repo, folder = parts
    repo, _, rev = repo.partition("@")
    return kind, f"{owner}/{repo}", rev or None, folder


def default_cache_dir() -> Path:
    """$JAXEFF_CACHE, else $XDG_CACHE_HOME/jaxeff, else ~/.cache/jaxeff."""
    if os.environ.get("JAXEFF_CACHE"):
        return Path(os.environ["JAXEFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxeff"


def _download(url: str, dest: Path) -> None:
    """urllib download to dest, written under a temporary name first so a failure leaves no partial file."""
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response:
        tmp.write_bytes(response.read())
    tmp.replace(dest)


def _remove_empty_dirs(path: Path, root: Path) -> None:
    """rmdir `path` and its parents below `root` while they are empty (a failed first download leaves no folders)."""
    while path != root and root in path.parents and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent


def resolve_pattern(source: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local pattern directory for `source`: a path is returned as is; an `hf:` / `github:` name (see
    `parse_pattern_name`) is downloaded on first use. GitHub files go to `cache_dir` (default `default_cache_dir()`)
    under github/<owner>/<repo>/<ref>/<folder>; Hugging Face names go through `jaxeff.io.hub.resolve` (the hub's
    cache, or `cache_dir`). Without a network a name that is not cached raises ConnectionError saying how to use a
    local copy instead."""
    if not is_pattern_name(source):
        return Path(source)
    kind, repo, rev, folder = parse_pattern_name(source)
    if kind == "github":
        offline_hint = (f"could not download the DuoAttention pattern {source!r}: the machine seems offline or the "
                        f"name is wrong. Download {TSV_NAME} and {CONFIG_NAME} of that folder elsewhere and pass the "
                        f"local directory instead")
        ref = rev or "main"
        root = Path(cache_dir or default_cache_dir())
        local = root / "github" / repo / ref / folder
        local.mkdir(parents=True, exist_ok=True)
        for name in (TSV_NAME, CONFIG_NAME):
            if not (local / name).is_file():
                url = f"https://raw.githubusercontent.com/{repo}/{urllib.parse.quote(ref)}/" \
                      f"{urllib.parse.quote(folder, safe='/=')}/{name}"
                try:
                    _download(url, local / name)
                except OSError as err:  # urllib's URLError/HTTPError, timeouts
                    _remove_empty_dirs(local, root)
                    raise ConnectionError(f"{offline_hint} ({url}: {err})") from err
        return local
    return hub.resolve(source, allow_patterns=[f"{folder}/{TSV_NAME}", f"{folder}/{CONFIG_NAME}"],
                       cache_dir=cache_dir)


def load_pattern(source: str | Path, cache_dir: str | Path | None = None) -> tuple[np.ndarray, int, int]:
    """Returns (alpha float32 [layers, kv_heads] clipped to [0, 1], sink_size, recent_size).

    `source`: a pattern directory, an `hf:` / `github:` name (downloaded and cached by `resolve_pattern`), e.g.
    `RELEASED_PATTERNS["Meta-Llama-3.1-8B-Instruct"]`, or a key of `RELEASED_PATTERNS` itself (when no directory of
    that name exists)."""
    if isinstance(source, str) and source in RELEASED_PATTERNS and not Path(source).exists():
        source = RELEASED_PATTERNS[source]
    directory = resolve_pattern(source, cache_dir)
    tsv, cfg_path = directory / TSV_NAME, directory / CONFIG_NAME
    for path in (tsv, cfg_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a DuoAttention pattern directory: {path.name} is missing "
                                    f"(released patterns by name: {sorted(RELEASED_PATTERNS)})")
    try:
        with warnings.catch_warnings():  # an empty file: numpy warns, the size check below says it
            warnings.simplefilter("ignore", UserWarning)
            alpha = np.loadtxt(tsv, dtype=np.float64, delimiter="\t", ndmin=2)
    except ValueError as err:
        raise ValueError(f"{tsv} is not a tab-separated [layers x KV heads] matrix of gate values: {err}") from err
    if not alpha.size:
        raise ValueError(f"{tsv} holds no gate values")
    if not np.isfinite(alpha).all():
        raise ValueError(f"{tsv} holds non-finite gate values")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object with sink_size and recent_size, got {cfg!r:.80}")
    missing = [k for k in ("sink_size", "recent_size") if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_path} lacks {missing}")
    sink = require_int(cfg["sink_size"], f"sink_size in {cfg_path}", 0)
    recent = require_int(cfg["recent_size"], f"recent_size in {cfg_path}", 1)
    return np.clip(alpha, 0.0, 1.0).astype(np.float32), sink, recent


def save_pattern(directory: str | Path, alpha, sink_size: int, recent_size: int, **config) -> Path:
    """Writes the official format; `config` adds training arguments (lr, num_steps, ...) to config.json.

    ValueError (before anything is written) for alpha that is not a finite non-empty [layers, kv_heads] array,
    sink_size < 0, recent_size < 1 or a config value JSON cannot hold (e.g. a numpy scalar: pass float(x))."""
    alpha = np.asarray(alpha, np.float64)
    if alpha.ndim != 2 or not alpha.size:
        raise ValueError(f"alpha must be a non-empty [layers, kv_heads] array, got shape {alpha.shape}")
    if not np.isfinite(alpha).all():
        raise ValueError("alpha holds non-finite gate values (NaN or inf): a diverged gate training?")
    cfg = dict(config, sink_size=require_int(sink_size, "sink_size", 0),
               recent_size=require_int(recent_size, "recent_size", 1))
    try:
        text = json.dumps(cfg, indent=2)
    except TypeError as err:
        raise ValueError(f"config.json cannot hold the given config ({err}); pass plain Python values") from err
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.savetxt(directory / TSV_NAME, alpha, delimiter="\t")
    (directory / CONFIG_NAME).write_text(text)
    return directory


def check_pattern(alpha, num_layers: int, num_kv_heads: int) -> np.ndarray:
    """ValueError unless alpha is [num_layers, num_kv_heads] (a pattern made for another model)."""
    alpha = np.asarray(alpha)
    if alpha.shape != (num_layers, num_kv_heads):
        raise ValueError(f"attention pattern has shape {alpha.shape} but the model has {num_layers} layers x "
                         f"{num_kv_heads} KV heads: the pattern belongs to another model")
    return alpha


def check_head_mask(mask, name: str = "retrieval_heads", shape: tuple[int, int] | None = None, *,
                    streaming: bool = False) -> np.ndarray:
    """mask as a bool numpy array [layers, kv_heads]: the head split `generate`, `DualKVCache.init` and LServe take
    (True = retrieval head; with `streaming=True` the inverse, True = streaming head).

    ValueError naming `name` unless it is a bool array of shape [layers, kv_heads] (of `shape` when given). Gate
    values alpha (floats) are refused: they must go through `select_retrieval_heads(alpha, sparsity)` first
    (cast to bool, every nonzero gate would make a retrieval head). Integers are refused too, 0/1 flags included,
    since an int array may as well hold head indices: pass `mask.astype(bool)` for 0/1 flags."""
    arr = np.asarray(mask)
    select = "~select_retrieval_heads(alpha, sparsity)" if streaming else "select_retrieval_heads(alpha, sparsity)"
    if arr.dtype != bool:
        if np.issubdtype(arr.dtype, np.floating):
            flags = arr.size and np.isin(arr, (0.0, 1.0)).all()
            why = (f"{name} holds gate values (float): pass {select}"
                   + (", or mask.astype(bool) if these 0.0 / 1.0 values are already a selection" if flags else ""))
        elif np.issubdtype(arr.dtype, np.integer):
            why = (f"{name} holds integers: pass mask.astype(bool) for 0/1 flags (True = "
                   f"{'streaming' if streaming else 'retrieval'} head), not head indices")
        else:
            why = f"{name} must be a bool array, got {mask!r:.80}"
        raise ValueError(f"{why} (a bool [layers, kv_heads] mask is expected)")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape} but the model has {shape[0]} layers x {shape[1]} KV heads: "
                         f"a pattern of another model?")
    if arr.ndim != 2:
        raise ValueError(f"{name} has shape {arr.shape} but must be [layers, kv_heads]")
    return arr


def select_retrieval_heads(alpha, sparsity: float, *, seed: int | None = 42) -> np.ndarray:
    """Bool [layers, kv_heads]: the official `sparsify_attention_heads` (`duo_attn/utils.py:353-373`).

    alpha is clipped to [0, 1], uniform noise in [0, 1e-6) is added, and a head is a retrieval head iff its noisy
    alpha >= `np.quantile(noisy, sparsity)`. The noise breaks ties (frequent in the bf16 patterns, see
    `selection_ties`), so the chosen set among tied heads depends on it. Official code draws it from numpy's global
    stream (seeded 42 in LongBench's pred.py, unseeded elsewhere); here it is the first draw of
    `np.random.RandomState(seed)`, which equals the global stream right after `np.random.seed(seed)` (LongBench's
    only if nothing drew from it between the seeding and the selection). seed None: a fresh OS-seeded draw.
    sparsity 0 / 1: every head retrieval / streaming. ValueError for sparsity outside [0, 1] (the fraction of
    streaming heads, not a percentage) or alpha with NaN / inf (a NaN would make every head streaming).
    """
    sparsity = require_number(sparsity, "sparsity (the fraction of streaming heads)", 0.0, 1.0)
    alpha = np.asarray(alpha, np.float64)
    if not np.isfinite(alpha).all():
        raise ValueError("alpha holds non-finite gate values (NaN or inf): a diverged gate training?")
    alpha = np.clip(alpha, 0.0, 1.0)
    if sparsity == 0.0:
        return np.ones(alpha.shape, bool)
    if sparsity == 1.0:
        return np.zeros(alpha.shape, bool)
    noisy = alpha + np.random.RandomState(seed).uniform(0, 1e-6, alpha.shape)
    return noisy >= np.quantile(noisy, sparsity)


def selection_ties(alpha, retrieval) -> dict:
    """How much of a selection the tie-breaking noise decided: the lowest kept alpha (clipped), the number of heads
    within the noise (1e-6) of it ("tied") and how many of those were kept ("kept"); `noise_decided` is True when
    tied > kept, i.e. another seed could keep other heads. E.g. Llama-3-8B-Gradient-1048k at sparsity 0.5 has 3 heads
    tied for 1 slot (reference note)."""
    alpha = np.clip(np.asarray(alpha, np.float64), 0.0, 1.0)
    retrieval = check_head_mask(retrieval, "retrieval")
    if alpha.shape != retrieval.shape:
        raise ValueError(f"alpha {alpha.shape} and retrieval {retrieval.shape} differ in shape")
    if not retrieval.any() or retrieval.all():
        return {"boundary": None, "tied": 0, "kept": 0, "noise_decided": False}
    boundary = float(alpha[retrieval].min())
    near = np.abs(alpha - boundary) < 1e-6
    tied, kept = int(near.sum()), int((near & retrieval).sum())
    return {"boundary": boundary, "tied": tied, "kept": kept, "noise_decided": tied > kept}


def kv_cache_ratio(retrieval_fraction: float, sink: int, recent: int, context: int) -> float:
    """The paper's KV-cache size relative to dense: r + (1 - r) * min(sink + recent, L) / L, r the fraction of
    retrieval heads (`1 - sparsity`, or `mask.mean()` of a selection), L = context tokens. ValueError for r outside
    [0, 1], sink < 0, recent < 1 or context < 1."""
    r = require_number(retrieval_fraction, "retrieval_fraction", 0.0, 1.0)
    window = require_int(sink, "sink", 0) + require_int(recent, "recent", 1)
    context = require_int(context, "context", 1)
    return r + (1 - r) * min(window, context) / context
