"""Stage images: a safetensors-format byte stream of the tensors one pipeline stage needs.

An image is *described*, never built in memory: a header (8-byte length + JSON, padded to 8
bytes) followed by tensor bytes that are byte ranges of the checkpoint's files. The remote store
serves any range of it; the storage agent writes it into shared memory; the worker parses the
header as soon as it arrives and loads each tensor the moment its bytes are complete. Tensors keep
checkpoint order, so reads are sequential.

Kinds (:class:`ImageKind`): ``stage`` (stage rank of p), ``rest`` (the whole model minus what stage
rank of p holds: a consolidating worker's fetch) and ``full`` (the whole model, p = 1).
"""
from __future__ import annotations

import enum
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hydraserve.store.checkpoint import TensorInfo, scan_checkpoint
from hydraserve.store.layout import StageLayout

MAX_PIPELINE = 16


class ImageKind(enum.Enum):
    STAGE = "stage"
    REST = "rest"
    FULL = "full"


@dataclass(frozen=True)
class ImageSpec:
    """Which image of which model: (model, kind, p, rank)."""

    model: str
    kind: ImageKind
    p: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.kind is ImageKind.FULL and (self.p, self.rank) != (1, 0):
            raise ValueError("a full image has p = 1 and rank = 0")
        if not 1 <= self.p <= MAX_PIPELINE:
            raise ValueError(f"p must be in 1..{MAX_PIPELINE}, got {self.p}")
        if not 0 <= self.rank < self.p:
            raise ValueError(f"rank must be in 0..{self.p - 1}, got {self.rank}")

    @property
    def key(self) -> str:
        return f"{self.model}:{self.kind.value}:{self.p}:{self.rank}"

    def to_dict(self) -> dict:
        return {"model": self.model, "kind": self.kind.value, "p": self.p, "rank": self.rank}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        try:
            return cls(str(d["model"]), ImageKind(d.get("kind", "stage")), int(d.get("p", 1)),
                       int(d.get("rank", 0)))
        except KeyError as e:
            raise ValueError(f"missing field {e}") from None


@dataclass(frozen=True)
class Piece:
    """Image bytes [offset, offset + length) come from ``file`` at ``file_offset``."""

    offset: int
    file: Path
    file_offset: int
    length: int


def encode_header(tensors: list[TensorInfo], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding ``tensors`` in order."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    off = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# model files carried in every image's safetensors metadata, so a worker needs nothing else
CARRIED_FILES = ("config.json", "generation_config.json")
# the small files besides the weights that a stock engine wants in a model folder (the remote
# store serves them as they are)
SIDE_FILES = (*CARRIED_FILES, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


class StageImage:
    def __init__(self, tensors: list[TensorInfo], metadata: dict[str, str] | None = None):
        self.tensors = tensors
        self.prefix = encode_header(tensors, metadata)
        pieces: list[Piece] = []
        off = len(self.prefix)
        for t in tensors:
            last = pieces[-1] if pieces else None
            if last and last.file == t.file and last.file_offset + last.length == t.start:
                pieces[-1] = Piece(last.offset, last.file, last.file_offset, last.length + t.nbytes)
            else:
                pieces.append(Piece(off, t.file, t.start, t.nbytes))
            off += t.nbytes
        self.pieces = pieces
        self.size = off

    @classmethod
    def build(cls, model_dir: str | Path, spec: ImageSpec,
              layout: StageLayout | None = None) -> "StageImage":
        layout = layout or StageLayout(scan_checkpoint(Path(model_dir)))
        if spec.kind is ImageKind.FULL:
            names = list(layout.tensors)
        else:
            stage = layout.stage(spec.rank, spec.p)
            names = layout.tensor_names(stage) if spec.kind is ImageKind.STAGE \
                else layout.rest_names(stage)
        order = {n: i for i, n in enumerate(layout.tensors)}
        carried = {f: (Path(model_dir) / f).read_text() for f in CARRIED_FILES
                   if (Path(model_dir) / f).exists()}
        return cls([layout.tensors[n] for n in sorted(names, key=order.__getitem__)], carried)

    def spans(self, start: int = 0,
              end: int | None = None) -> Iterator[bytes | tuple[Path, int, int]]:
        """What makes up the image bytes [start, end), in order: the header's bytes (``bytes``),
        then ``(file, file_offset, length)`` ranges of the checkpoint files, which a sender can
        hand to ``sendfile`` as they are."""
        end = self.size if end is None else min(end, self.size)
        pos = start
        if pos < len(self.prefix):
            head = self.prefix[pos:min(end, len(self.prefix))]
            pos += len(head)
            if head:
                yield head
        for p in self.pieces:
            if pos >= end:
                break
            if p.offset + p.length <= pos:
                continue
            n = min(end, p.offset + p.length) - pos
            yield p.file, p.file_offset + pos - p.offset, n
            pos += n

    def read(self, start: int = 0, end: int | None = None,
             chunk: int = 1 << 20) -> Iterator[bytes]:
        """Yield the image bytes [start, end) in chunks of at most ``chunk`` bytes."""
        fds: dict[Path, int] = {}
        try:
            for part in self.spans(start, end):
                if isinstance(part, bytes):
                    yield part
                    continue
                path, off, length = part
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
                for at in range(off, off + length, chunk):
                    n = min(chunk, off + length - at)
                    data = os.pread(fd, n, at)
                    if len(data) != n:
                        raise OSError(f"{path} is shorter than its header says")
                    yield data
        finally:
            for fd in fds.values():
                os.close(fd)


def parse_header(buf: bytes | memoryview) -> tuple[int, dict, dict[str, str]] | None:
    """(data start, tensor table, metadata) once ``buf`` holds the whole header, else None."""
    if len(buf) < 8:
        return None
    (n,) = struct.unpack_from("<Q", buf, 0)
    if len(buf) < 8 + n:
        return None
    header = json.loads(bytes(buf[8:8 + n]))
    metadata = header.pop("__metadata__", None) or {}
    return 8 + n, header, metadata


def header_length(buf: bytes | memoryview) -> int | None:
    """Total prefix length (8 + JSON) once the first 8 bytes are there."""
    return None if len(buf) < 8 else 8 + struct.unpack_from("<Q", buf, 0)[0]
