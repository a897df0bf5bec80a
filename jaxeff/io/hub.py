"""One way to name released weights: a local path, or `hf:<owner>/<repo>[@<revision>][/<path in the repo>]`.

`resolve` downloads an `hf:` name once with `huggingface_hub.snapshot_download` (only the files asked for) into the
Hugging Face cache (`HF_HOME`, or `cache_dir`) and returns the local path; later calls read the cache, offline too.
Every loader that takes a checkpoint (`jaxeff.io.from_pretrained`, HART, NVILA, LPD, the DuoAttention patterns) and
every `ckpt=` / `pattern=` experiment option goes through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PREFIX = "hf:"
# What a transformers-style model folder needs: config, weights, tokenizer and chat template.
HF_MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")


def is_hub_name(source) -> bool:
    """True for an `hf:` name, False for a local path."""
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(name: str) -> tuple[str, str | None, str]:
    """`"hf:owner/repo[@rev][/path]"` -> ("owner/repo", rev or None, "path" or "").

    Raises ValueError naming the expected form when `name` has no owner/repo."""
    parts = name[len(PREFIX):].strip("/").split("/", 2)
    if not name.startswith(PREFIX) or len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{name!r} is not 'hf:<owner>/<repo>[@<revision>][/<path>]'")
    repo, _, rev = parts[1].partition("@")
    return f"{parts[0]}/{repo}", rev or None, parts[2] if len(parts) == 3 else ""


def _snapshot(repo_id: str, **kwargs) -> str:
    """`huggingface_hub.snapshot_download` (the one place that downloads; tests replace it)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **kwargs)


def resolve(source: str | Path, *, allow_patterns: Sequence[str] | None = None,
            cache_dir: str | Path | None = None) -> Path:
    """The local path of `source`: a path is returned as is; an `hf:` name is downloaded on first use.

    Only the files under the name's path (or matching `allow_patterns`, relative to the repository root) are
    fetched. Raises ValueError for a malformed name, PermissionError for a gated repository without an accepted
    licence / token, FileNotFoundError for an unknown repository, revision or path, and ConnectionError when the
    Hub cannot be reached and nothing is cached, each saying what to do instead."""
    if not is_hub_name(source):
        return Path(source)
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo, rev, sub = parse(source)
    patterns = list(allow_patterns) if allow_patterns else ([sub, f"{sub}/*"] if sub else None)
    local_hint = (f"download it elsewhere (`hf download {repo}{f' --revision {rev}' if rev else ''}"
                  f" --local-dir DIR`) and pass the local path instead")
    try:
        root = _snapshot(repo, revision=rev, allow_patterns=patterns, cache_dir=cache_dir)
    except GatedRepoError as e:
        raise PermissionError(f"{source!r}: {repo} is gated on the Hugging Face Hub: accept its licence on its page "
                              f"and log in (`hf auth login` or HF_TOKEN), or {local_hint}") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{source!r}: no such repository or revision on the Hugging Face Hub "
                                f"({type(e).__name__})") from e
    except Exception as e:  # offline (LocalEntryNotFoundError), HTTP and network errors: the cause is chained
        raise ConnectionError(f"could not download {source!r} from the Hugging Face Hub: the machine seems offline "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"{local_hint}") from e
    path = Path(root) / sub
    if not path.exists():
        raise FileNotFoundError(f"{source!r}: {repo} has no {sub!r}")
    return path
