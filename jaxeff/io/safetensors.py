"""Reading and writing the safetensors format without torch.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets}, then the raw little-endian bytes. Reading memory-maps the file, so opening a
multi-GB checkpoint costs nothing until a tensor is used; bfloat16 comes back as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    pass


def read_header(path: str | Path) -> tuple[dict, int]:
    """Return (header dict, byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise SafetensorsError(f"{path}: implausible header length {n}; not a safetensors file?")
        header = json.loads(f.read(n))
    return header, 8 + n


def load_file(path: str | Path, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """Load tensors (all, or `keys`) as numpy arrays backed by a read-only memory map."""
    header, start = read_header(path)
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name in header if keys is None else keys:
        if name not in header:
            raise SafetensorsError(f"{path}: no tensor named {name!r}")
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        out[name] = data[start + begin : start + end].view(dtype).reshape(info["shape"])
    return out


def save_file(tensors: Mapping[str, np.ndarray], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy or jax arrays) as one safetensors file."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        span = [offset, offset + arr.nbytes]
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": span}
        arrays.append(arr)
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    tmp.replace(path)


def load_checkpoint_dir(directory: str | Path, stem: str = "model") -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face-style directory: `<stem>.safetensors` or a sharded
    `<stem>.safetensors.index.json`; `stem` is e.g. "model" or "diffusion_pytorch_model"."""
    directory = Path(directory)
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).exists():
                raise FileNotFoundError(f"{directory}: shard {shard} listed in {index.name} is missing")
            out.update(load_file(directory / shard))
        missing = set(weight_map) - set(out)
        if missing:
            raise SafetensorsError(f"{index}: tensors listed but not found in shards: {sorted(missing)[:10]}")
        return out
    if single.exists():
        return load_file(single)
    raise FileNotFoundError(f"{directory}: neither {single.name} nor {index.name} found")


def save_checkpoint_dir(
    tensors: Mapping[str, np.ndarray], directory: str | Path, stem: str = "model", max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write tensors as `<stem>.safetensors`, or as shards plus `<stem>.safetensors.index.json` when large."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = np.asarray(tensors[name]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, directory / f"{stem}.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, directory / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        total += sum(np.asarray(tensors[n]).nbytes for n in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
