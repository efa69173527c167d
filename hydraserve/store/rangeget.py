"""The storage agent's receiving end: HTTP/1.1 range GETs read straight into shared memory.

A :class:`RangeConnection` is one keep-alive connection to the remote store, used from one
thread at a time. :meth:`RangeConnection.get_into` sends ``GET path`` with ``Range: bytes=a-b``,
parses the response head itself and then ``recv_into``s the body directly into the caller's
memoryview (a slice of the region), so each byte is copied once, kernel to region, with no
HTTP library buffers, no intermediate ``bytes`` and no slicing in between. Pacing is by grant
(:class:`~hydraserve.store.bandwidth.Link`), one reservation per ~20 ms of the link's rate.

Anything but a ``206`` with the exact ``Content-Range`` asked for is an error: the store's JSON
error (with its status) for 4xx/5xx, :class:`ConnectionError` for a cut or a short body (the
caller resumes from the bytes it has).
"""
from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
from typing import Callable
from urllib.parse import urlsplit

from hydraserve.store.bandwidth import Link

HEAD_LIMIT = 64 * 1024  # a response head larger than this is not our store's


class HTTPStatusError(RuntimeError):
    """The store answered something else than the range asked for."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RangeConnection:
    def __init__(self, base_url: str, token: str | None = None, connect_s: float = 10.0,
                 read_s: float = 30.0):
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"the remote store URL must be http(s)://, got {base_url!r}")
        self.tls = url.scheme == "https"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if self.tls else 80)
        self.prefix = url.path.rstrip("/")
        self.host_header = url.netloc.rsplit("@", 1)[-1]
        self.token = token
        self.connect_s, self.read_s = connect_s, read_s
        self.sock: socket.socket | None = None
        self.waitall = 0 if self.tls else socket.MSG_WAITALL
        self._lock = threading.Lock()  # close() may come from another thread

    # -- the connection ----------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.read_s)
        else:
            # a blocking socket with the kernel's own timeouts: one syscall per read (Python's
            # settimeout() would poll before every recv)
            sock.settimeout(None)
            tv = struct.pack("ll", int(self.read_s), int(self.read_s % 1 * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        with self._lock:
            self.sock = sock
        return sock

    def close(self) -> None:
        """Close the connection; a ``get_into`` blocked on it in another thread fails at once
        (how a cancelled fetch stops its thread)."""
        with self._lock:
            sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    # -- one request ---------------------------------------------------------------------------
    def get_into(self, path: str, start: int, view: memoryview, link: Link,
                 progress: Callable[[int], None], stop: threading.Event | None = None) -> None:
        """Receive image bytes [start, start + len(view)) of ``path`` into ``view``. After each
        grant, ``progress(n)`` is told the n bytes now in (so the caller can advance the
        region's counter). Raises ConnectionError on a cut (after reporting what arrived),
        HTTPStatusError on any other answer than the 206 asked for."""
        want = len(view)
        sock = self.sock or self._connect()
        try:
            head, body = self._exchange(sock, path, start, start + want - 1)
            status, headers = parse_head(head)
            length = int(headers.get("content-length", -1))
            if status != 206:
                raise HTTPStatusError(status, self._error_text(sock, status, body, length))
            expected = f"bytes {start}-{start + want - 1}/"
            if not headers.get("content-range", "").startswith(expected) or length != want:
                raise HTTPStatusError(502, f"the store answered range "
                                           f"{headers.get('content-range')!r} ({length} bytes), "
                                           f"not {expected}...")
            keep = headers.get("connection", "").lower() != "close"
            got = min(len(body), want)
            view[:got] = body[:got]
            grant = link.grant()
            done = 0  # bytes reported through progress()
            try:
                while got < want:
                    if stop is not None and stop.is_set():
                        raise ConnectionError("the fetch was cancelled")
                    target = min(want, got + grant)
                    link.acquire_blocking(target - got)
                    while got < target:
                        # MSG_WAITALL: the kernel fills the whole grant before returning (fewer
                        # wake-ups and calls); a cut or the read timeout returns what came
                        n = sock.recv_into(view[got:target], 0, self.waitall)
                        if n == 0:
                            raise ConnectionError("the store closed the connection mid-body")
                        got += n
                    progress(got - done)
                    done = got
            finally:
                if done < got:  # what came before a cut counts: the caller resumes after it
                    progress(got - done)
            if not keep:
                self.close()
        except BaseException:
            self.close()  # the connection's state is unknown: never reuse it
            raise

    def _exchange(self, sock: socket.socket, path: str, first: int,
                  last: int) -> tuple[bytes, bytes]:
        """Send the request; (response head, body bytes read along with it)."""
        lines = [f"GET {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}",
                 f"Range: bytes={first}-{last}", "Accept-Encoding: identity"]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        buf = b""
        while True:
            data = sock.recv(HEAD_LIMIT)
            if not data:
                raise ConnectionError("the store closed the connection before answering")
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return buf[:end], buf[end + 4:]
            if len(buf) > HEAD_LIMIT:
                raise HTTPStatusError(502, "the store's response head is too long")

    def _error_text(self, sock: socket.socket, status: int, body: bytes, length: int) -> str:
        """The store's {"error": ...} message of a non-206 answer (best effort)."""
        try:
            while 0 <= length and len(body) < min(length, HEAD_LIMIT):
                data = sock.recv(HEAD_LIMIT)
                if not data:
                    break
                body += data
            return str(json.loads(body)["error"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"remote store answered {status}"


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """(status, lower-cased headers) of an HTTP/1.x response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HTTPStatusError(502, f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers
