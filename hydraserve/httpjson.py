"""Small blocking JSON-over-HTTP calls with the standard library (no aiohttp import), for
processes that must talk to a server before, or without, loading the async stack.

Every call takes the cluster token explicitly (``token``, sent as "Authorization: Bearer TOKEN"
when set): a process may talk to servers of different clusters, or to one without a token."""
from __future__ import annotations

import http.client
import json
from typing import Iterator
from urllib.parse import urlsplit


class CallError(RuntimeError):
    """The server was unreachable or answered with an error status."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _connect(url: str, timeout: float) -> http.client.HTTPConnection:
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def _request(url: str, method: str, path: str, data: bytes | None, timeout: float,
             token: str | None) -> tuple[int, bytes]:
    conn = _connect(url, timeout)
    try:
        conn.request(method, path, body=data, headers=_headers(token))
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError as e:
        raise CallError(f"{url} unreachable: {e}") from None
    finally:
        conn.close()


def call(url: str, method: str, path: str, body: dict | None = None, timeout: float = 30.0,
         token: str | None = None) -> dict:
    """One JSON request; returns the decoded answer or raises :class:`CallError`."""
    status, payload = _request(url, method, path,
                               None if body is None else json.dumps(body).encode(), timeout, token)
    try:
        out = json.loads(payload or b"{}")
    except ValueError:
        out = {"error": payload[:200].decode(errors="replace")}
    if status >= 400:
        raise CallError(f"{method} {path}: {status} {out.get('error', out)}", status)
    return out


def get_bytes(url: str, path: str, timeout: float = 30.0, token: str | None = None) -> bytes:
    """GET ``path`` and return the body as it is; raises :class:`CallError` (with the status)."""
    status, payload = _request(url, "GET", path, None, timeout, token)
    if status >= 400:
        raise CallError(f"GET {path}: {status} {payload[:200]!r}", status)
    return payload


def stream(url: str, path: str, body: dict, timeout: float = 300.0,
           token: str | None = None) -> Iterator[dict]:
    """POST ``body`` and yield each JSON line of a newline-delimited streaming answer."""
    conn = _connect(url, timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=_headers(token))
        resp = conn.getresponse()
        if resp.status >= 400:
            payload = resp.read()
            try:
                msg = json.loads(payload).get("error", payload)
            except ValueError:
                msg = payload[:200]
            raise CallError(f"POST {path}: {resp.status} {msg}", resp.status)
        while True:
            line = resp.readline()
            if not line:
                return
            if line.strip():
                yield json.loads(line)
    except OSError as e:
        raise CallError(f"{url} unreachable or stream broken: {e}") from None
    finally:
        conn.close()
