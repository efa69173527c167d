"""Framed messages between pipeline stages over TCP: a small JSON header, then raw tensor bytes.

Frame: b"HSF1" | u32 header length | header JSON | tensor bytes, back to back. The header lists
each tensor's name, dtype and shape; nothing is unpickled from the network, and a frame whose
header is malformed or oversized closes the connection.
"""
from __future__ import annotations

import json
import socket
import struct

import torch

MAGIC = b"HSF1"
MAX_HEADER = 16 * 2**20
MAX_PAYLOAD = 64 * 2**30
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}
NAMES = {v: k for k, v in DTYPES.items()}


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (or sent a frame we refuse)."""


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionClosed("peer closed the connection")
        got += k


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return buf


def send_msg(sock: socket.socket, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
    tensors = tensors or {}
    blobs, meta = [], []
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        meta.append({"name": name, "dtype": NAMES[t.dtype], "shape": list(t.shape)})
        blobs.append(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"")
    raw = json.dumps({**header, "tensors": meta}, separators=(",", ":")).encode()
    sock.sendall(MAGIC + struct.pack("<I", len(raw)) + raw)
    for b in blobs:
        if len(b):
            sock.sendall(memoryview(b))


def recv_msg(sock: socket.socket) -> tuple[dict, dict[str, torch.Tensor]]:
    prefix = _recv_exact(sock, 8)
    if bytes(prefix[:4]) != MAGIC:
        raise ConnectionClosed("bad frame magic")
    (n,) = struct.unpack_from("<I", prefix, 4)
    if n > MAX_HEADER:
        raise ConnectionClosed(f"frame header of {n} bytes is too large")
    try:
        header = json.loads(_recv_exact(sock, n))
        metas = header.pop("tensors", [])
        sizes = []
        for m in metas:
            dtype = DTYPES[m["dtype"]]
            shape = [int(d) for d in m["shape"]]
            if any(d < 0 for d in shape):
                raise ValueError("negative dimension")
            sizes.append((m["name"], dtype, shape, dtype.itemsize * _numel(shape)))
    except (ValueError, KeyError, TypeError) as e:
        raise ConnectionClosed(f"malformed frame header: {e}") from None
    if sum(s[3] for s in sizes) > MAX_PAYLOAD:
        raise ConnectionClosed("frame payload too large")
    tensors = {}
    for name, dtype, shape, nbytes in sizes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            _recv_into(sock, memoryview(buf.numpy()))
        tensors[name] = buf.view(dtype).reshape(shape)
    return header, tensors


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
