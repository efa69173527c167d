"""Reading a Hugging Face checkpoint directory without loading tensors.

A checkpoint is one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
We parse only the safetensors headers, so callers learn every tensor's dtype, shape and absolute
byte range in its file. The stage layout uses the sizes; the fetch path serves the byte ranges.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype tag -> bytes per element
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """The directory is not a readable safetensors checkpoint."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: ``file`` and the absolute range [start, end)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict, int]:
    """Return (header dict, offset of the data section) of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise CheckpointError(f"{path}: implausible safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in a stable order."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise CheckpointError(
            f"{model_dir}: no safetensors weights (expected model.safetensors or "
            "model.safetensors.index.json); .bin checkpoints are not supported")
    return found


def scan_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Map every tensor name in the checkpoint to its :class:`TensorInfo`, in file order."""
    tensors: dict[str, TensorInfo] = {}
    for path in checkpoint_files(model_dir):
        if not path.exists():
            raise CheckpointError(f"{path}: listed in the index but missing")
        header, base = read_header(path)
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
        for name, meta in entries:
            if meta["dtype"] not in DTYPE_SIZES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
            start, end = meta["data_offsets"]
            tensors[name] = TensorInfo(name, path, meta["dtype"], tuple(meta["shape"]),
                                       base + start, base + end)
    return tensors
