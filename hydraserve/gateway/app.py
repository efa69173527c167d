"""The gateway application (FastAPI): OpenAI API, admin API, health and metrics.

  POST /v1/completions  POST /v1/chat/completions
  GET  /v1/models  POST /tokenize  POST /detokenize  GET /version  (extras.py)
  GET  /health                          GET  /metrics
  GET  /admin/models   POST /admin/models   DELETE /admin/models/{name}   GET /admin/instances
       (admin routes need "Authorization: Bearer TOKEN" when an admin token is configured)
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hydraserve.config import (ClusterConfig, ConfigError, GatewayConfig, ModelConfigEntry,
                               model_entry_from_dict)
from hydraserve.control.controller import Controller, Draining, QueueFull
from hydraserve.control.instance import Request
from hydraserve.engine.config import ModelLoadError
from hydraserve.gateway.detok import Detokenizer
from hydraserve.gateway.extras import add_extra_routes
from hydraserve.gateway.limits import BodyLimits
from hydraserve.gateway.metrics import Metrics
from hydraserve.gateway.openai_api import (ERROR_TYPES, ChatBody, CompletionBody, Shaper, error,
                                           invalid_body, sse)
from hydraserve.tokenizer import Tokenizer

log = logging.getLogger("hydraserve.gateway")


class Gateway:
    """Owns the controller, the tokenizers and the metrics of one serving endpoint."""

    def __init__(self, gw: GatewayConfig, cluster_cfg: ClusterConfig, cluster,
                 models: list[ModelConfigEntry]):
        self.gw, self.cluster_cfg, self.cluster = gw, cluster_cfg, cluster
        self.initial_models = models
        self.controller = Controller.build(cluster, cluster_cfg, gw)
        self.preset = self.controller.preset
        self.metrics = Metrics(self.controller)
        self.tokenizers: dict[str, Tokenizer] = {}
        self.created: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    def begin_drain(self, grace_s: float) -> None:
        """Stop taking requests and end the open ones within ``grace_s`` seconds (each gets
        its final event). Safe to call from a signal handler or another thread."""
        if self._loop is None or self._draining:
            return
        self._draining = True
        log.info("shutting down: open requests have %.0f s to finish", grace_s)
        self._loop.call_soon_threadsafe(self.controller.begin_drain, grace_s)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        await loop.run_in_executor(None, self.cluster.start)
        await self.controller.start()
        for m in self.initial_models:
            await self.register(m)

    async def close(self) -> None:
        await self.controller.close()
        await asyncio.get_running_loop().run_in_executor(None, self.cluster.close)

    async def register(self, entry: ModelConfigEntry) -> None:
        self.tokenizers[entry.name] = Tokenizer.from_dir(entry.path)
        self.controller.register(entry)
        self.created[entry.name] = int(time.time())
        if self.preset.warm_cache:
            await self.controller.warm_cache(entry.name)


def _openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return error(status, message, ERROR_TYPES.get(status, "server_error"), param)


def create_app(gateway: Gateway, on_ready: Callable[[], None] | None = None) -> FastAPI:
    gw = gateway.gw

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await gateway.start()
        if on_ready:
            on_ready()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(title="HydraServe", lifespan=lifespan)
    app.add_middleware(BodyLimits, max_bytes=gw.max_body_bytes, max_depth=gw.max_body_depth)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        return _openai_error(400, *invalid_body(list(exc.errors())))

    @app.exception_handler(Exception)
    async def internal(request: HTTPRequest, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__} (see the gateway's log)",
                     "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        return _openai_error(exc.status_code, str(exc.detail))

    def admin_ok(request: HTTPRequest) -> bool:
        if not gw.admin_token:
            return True
        auth = request.headers.get("authorization", "")
        return secrets.compare_digest(auth, f"Bearer {gw.admin_token}")

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True, "exec_type": gw.exec_type, "models": list(gateway.tokenizers)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    add_extra_routes(app, gateway)  # /v1/models, /tokenize, /detokenize, /version

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        return await generate(body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HTTPRequest):
        return await generate(body, request, chat=True)

    async def generate(body, http: HTTPRequest, chat: bool):
        tok = gateway.tokenizers.get(body.model)
        if tok is None or gateway.controller.model(body.model) is None:
            return _openai_error(404, f"the model {body.model!r} does not exist", "model")
        if getattr(body, "logprobs", None):
            return _openai_error(400, "logprobs are not supported", "logprobs")
        if chat and not tok.has_chat_template:
            return _openai_error(400, f"the model {body.model!r} has no chat template; send the "
                                 "prompt to /v1/completions instead", "messages")
        if chat:
            try:
                text = tok.apply_chat_template([{"role": m.role, "content": m.text()}
                                                for m in body.messages])
            except Exception as e:  # noqa: BLE001 - a template error is the caller's input
                return _openai_error(400, f"chat template failed: {e}", "messages")
            prompt = tok.encode(text, add_special_tokens=False)
        elif isinstance(body.prompt, str):
            prompt = tok.encode(body.prompt)
        else:
            prompt = list(body.prompt)
            if any(t < 0 or t >= tok.vocab_size for t in prompt):
                return _openai_error(400, "prompt token ids are outside the vocabulary", "prompt")
        if not prompt:
            return _openai_error(400, "the prompt is empty", "prompt")
        room = gw.max_model_len - len(prompt)
        where = "messages" if chat else "prompt"
        if room < 1:
            return _openai_error(400, f"the prompt has {len(prompt)} tokens; this model's "
                                 f"context is {gw.max_model_len}", where)
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > room:  # refused, as vLLM and OpenAI do; never cut
            return _openai_error(400, f"this model's maximum context length is "
                                 f"{gw.max_model_len} tokens; the prompt has {len(prompt)} and "
                                 f"max_tokens asks for {asked} more ({len(prompt) + asked})",
                                 "max_tokens")
        if asked is not None and asked > gw.max_new_tokens:
            return _openai_error(400, f"max_tokens is {asked}; this server generates at most "
                                 f"{gw.max_new_tokens} tokens per request", "max_tokens")
        max_tokens = min(asked or (gw.max_new_tokens if chat else 16), room, gw.max_new_tokens)
        kv_tokens = gateway.controller.model(body.model).kv_tokens
        if gw.engine == "hydraserve" and len(prompt) + max_tokens > kv_tokens:
            # a worker could never hold this sequence: refuse it here instead of failing the
            # instance that would take it
            return _openai_error(400, f"the prompt ({len(prompt)} tokens) and max_tokens "
                                 f"({max_tokens}) need {len(prompt) + max_tokens} tokens of KV "
                                 f"cache; a worker of {body.model} holds {kv_tokens} "
                                 "(raise `serve --kv-cache-mb`)", "max_tokens")
        params = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                  "seed": body.seed, "ignore_eos": body.ignore_eos}
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        req = Request(rid, body.model, prompt, params)
        try:
            gateway.controller.submit(req)
        except QueueFull as e:
            resp = _openai_error(429, f"too many requests queued: {e}; retry after "
                                 f"{gw.retry_after_s} s")
            resp.headers["Retry-After"] = str(gw.retry_after_s)
            return resp
        except Draining as e:
            return _openai_error(503, str(e))
        shaper = Shaper(chat, rid, body.model)
        detok = Detokenizer(tok, body.stop_list())
        events = _events(req, detok, gateway, body.model)
        if body.stream:
            return StreamingResponse(_stream(_heartbeats(events, gw.sse_heartbeat_s), shaper,
                                             len(prompt), body.include_usage(), req, gateway),
                                     media_type="text/event-stream")
        text, finish, n = "", "length", 0
        try:
            async for delta, reason, count, err in events:
                if err:
                    status = err.get("status", 500)
                    return _openai_error(status if status in ERROR_TYPES else 500, err["error"])
                text += delta
                finish, n = reason or finish, count
        except asyncio.CancelledError:  # the client went away
            gateway.controller.cancel(req)
            raise
        return shaper.whole(text, finish, len(prompt), n)

    @app.get("/admin/models")
    async def admin_models(request: HTTPRequest):
        if not admin_ok(request):
            return _openai_error(401, "admin token required")
        return {"models": [{**asdict(ep.entry), "size_gb": ep.size_gb}
                           for ep in gateway.controller.models().values()]}

    @app.post("/admin/models")
    async def admin_register(request: HTTPRequest):
        if not admin_ok(request):
            return _openai_error(401, "admin token required")
        try:
            entry = model_entry_from_dict(await request.json())
            await gateway.register(entry)
        except (ValueError, KeyError, TypeError, ConfigError, ModelLoadError) as e:
            return _openai_error(400, f"cannot register the model: {e}")
        return {"registered": entry.name}

    @app.delete("/admin/models/{name}")
    async def admin_remove(name: str, request: HTTPRequest):
        if not admin_ok(request):
            return _openai_error(401, "admin token required")
        if gateway.controller.model(name) is None:
            return _openai_error(404, f"the model {name!r} does not exist")
        await gateway.controller.unregister(name)
        gateway.tokenizers.pop(name, None)
        return {"removed": name}

    @app.get("/admin/instances")
    async def admin_instances(request: HTTPRequest):
        if not admin_ok(request):
            return _openai_error(401, "admin token required")
        return {"instances": [i.describe() for i in gateway.controller.list_instances()],
                **gateway.controller.describe()}

    return app


async def _events(req: Request, detok: Detokenizer, gateway: Gateway,
                  model: str) -> AsyncIterator[tuple[str, str | None, int, dict | None]]:
    """(text delta, finish reason, tokens so far, error) per worker event; stops at the end."""
    n, last = 0, None
    while True:
        item = await req.events.get()
        if "error" in item:
            gateway.metrics.requests.labels(model, "error").inc()
            yield "", None, n, item
            return
        if item.get("token_id") is None:  # an engine may end a stream without a token
            reason = item.get("finish_reason") or "stop"
            gateway.metrics.requests.labels(model, "ok").inc()
            yield detok.flush(), reason, n, None
            return
        now = time.monotonic()
        if n == 0:
            gateway.metrics.ttft.labels(model).observe(now - req.arrival)
        elif last is not None:
            gateway.metrics.tpot.labels(model).observe(now - last)
        last = now
        n += 1
        delta = detok.push(item["token_id"])
        reason = item.get("finish_reason")
        if detok.stopped:
            gateway.controller.cancel(req, by_client=False)
            reason = "stop"
        elif reason:
            delta += detok.flush()
        if reason:
            gateway.metrics.requests.labels(model, "ok").inc()
            yield delta, reason, n, None
            return
        yield delta, None, n, None


HEARTBEAT = object()  # what _heartbeats yields when nothing came for a while


async def _heartbeats(events: AsyncIterator, every_s: float) -> AsyncIterator:
    """``events``, with HEARTBEAT in between whenever none came for ``every_s`` seconds (a cold
    start can take longer than a proxy's idle timeout). The pending read is never cancelled by a
    heartbeat, only when the stream ends early."""
    if every_s <= 0:
        async for item in events:
            yield item
        return
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield HEARTBEAT
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()


async def _stream(events, shaper: Shaper, prompt_len: int, include_usage: bool, req: Request,
                  gateway: Gateway) -> AsyncIterator[bytes]:
    first, n, done = True, 0, False
    try:
        async for item in events:
            if item is HEARTBEAT:
                yield b": heartbeat\n\n"  # an SSE comment: clients ignore it, proxies see traffic
                continue
            delta, reason, count, err = item
            if err:
                done = True  # ended by the server: not a cancellation
                yield sse({"error": {"message": err["error"], "type": "server_error",
                                     "code": err.get("status", 500)}})
                return
            n = count
            if shaper.chat and first:
                yield sse(shaper.chunk("", None, first=True))
            first = False
            if delta or reason:
                yield sse(shaper.chunk(delta, reason))
            if reason:
                done = True
        if include_usage:
            yield sse(shaper.usage_chunk(prompt_len, n))
        yield sse("[DONE]")
    finally:
        if not done:
            gateway.controller.cancel(req)
