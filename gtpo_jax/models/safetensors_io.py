"""Minimal safetensors reading (memory-mapped) and writing, bfloat16 included.

The format: 8 bytes little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw
tensor bytes. Reading maps the file and returns numpy views, so a loader can hand each device
only its own slice of a tensor (`jax.make_array_from_callback`) without a full copy in memory.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped; `file[name]` is a read-only numpy view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._base = 8 + n

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            e = self.entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        dtype = DTYPES[e["dtype"]]
        arr = np.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self._base + begin)
        return arr.reshape(e["shape"])


class CheckpointReader:
    """All tensors of a Hugging Face checkpoint directory (one file or an index of shards)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {f: SafetensorsFile(self.directory / f) for f in sorted(set(weight_map.values()))}
            self._where = {name: files[f] for name, f in weight_map.items()}
        elif (self.directory / SINGLE_FILE).exists():
            single = SafetensorsFile(self.directory / SINGLE_FILE)
            self._where = {name: single for name in single.keys()}
        else:
            raise FileNotFoundError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"{self.directory}: checkpoint has no tensor {name!r}")
        return self._where[name][name]

    def keys(self) -> list[str]:
        return list(self._where)


def _encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> tuple[bytes, list[np.ndarray]]:
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset, blobs = 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be written to safetensors")
        header[name] = {
            "dtype": NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        blobs.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw, blobs


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
    """Writes one safetensors file (atomically: a temporary file renamed into place)."""
    head, blobs = _encode(tensors, metadata)
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(head)
        for blob in blobs:
            f.write(memoryview(blob).cast("B"))
    os.replace(tmp, path)


def save_checkpoint(
    tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    directory: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Writes `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus the index
    when the tensors exceed `max_shard_bytes`. Returns the file names written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in items:
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, directory / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(a.nbytes for _, a in items)
    (directory / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return [*names, INDEX_FILE]
