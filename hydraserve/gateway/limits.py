"""Request-body limits at the gateway's edge, before any parsing: a size cap (413) and a JSON
nesting cap (400), both answered in the OpenAI error shape. A pure ASGI middleware: it buffers
the body once and hands the same bytes on."""
from __future__ import annotations

import re

from hydraserve.gateway.openai_api import error

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings ignored)."""
    depth = deepest = 0
    for b in _BRACKETS.findall(_STRINGS.sub(b"", data)):
        if b in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class BodyLimits:
    def __init__(self, app, max_bytes: int, max_depth: int):
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await error(413, f"the request body is larger than {self.max_bytes} bytes",
                            "invalid_request_error")(scope, receive, send)
                return
            chunks.append(body)
            if not msg.get("more_body"):
                break
        data = b"".join(chunks)
        if json_depth(data) > self.max_depth:
            await error(400, f"the request body nests deeper than {self.max_depth} levels",
                        "invalid_request_error")(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
