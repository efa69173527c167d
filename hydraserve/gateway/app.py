"""The gateway application (FastAPI): OpenAI API, admin API, health and metrics.

  POST /v1/completions  POST /v1/chat/completions  (the request path: generation.py)
  GET  /v1/models  POST /tokenize  POST /detokenize  GET /version  (extras.py)
  GET  /health                          GET  /metrics
  GET  /admin/models   POST /admin/models   DELETE /admin/models/{name}   GET /admin/instances
  GET  /dashboard   GET /admin/status   GET /admin/coldstarts[/{id}]  (dashboard.py)
       (admin routes need "Authorization: Bearer TOKEN" when an admin token is configured)
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from hydraserve.config import (ClusterConfig, ConfigError, GatewayConfig, ModelConfigEntry,
                               model_entry_from_dict)
from hydraserve.control.controller import Controller
from hydraserve.engine.config import ModelLoadError
from hydraserve.gateway.dashboard import add_dashboard_routes
from hydraserve.gateway.dashboard import admin_ok as dashboard_admin_ok
from hydraserve.gateway.extras import add_extra_routes
from hydraserve.gateway.generation import generate
from hydraserve.gateway.limits import BodyLimits
from hydraserve.gateway.metrics import Metrics
from hydraserve.gateway.openai_api import (ERROR_TYPES, ChatBody, CompletionBody, error,
                                           invalid_body)
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
        self._prepared: dict[str, tuple[str, Tokenizer]] = {}  # see prepare
        self.created: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self.handing_over = False

    def begin_drain(self, grace_s: float) -> None:
        """Stop taking requests and end the open ones within ``grace_s`` seconds (each gets
        its final event). Safe to call from a signal handler or another thread. After
        `hand_over` the instances are left to the new leader."""
        if self._loop is None or self._draining:
            return
        self._draining = True
        log.info("shutting down: open requests have %.0f s to finish%s", grace_s,
                 "; the cluster stays up for the standby that leads now"
                 if self.handing_over else "")
        self._loop.call_soon_threadsafe(self.controller.begin_drain, grace_s, self.handing_over)

    async def start(self) -> None:
        """Start (or find) the cluster, register the models, adopt what runs, then serve."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        await loop.run_in_executor(None, self.cluster.start)
        for m in self.initial_models:
            await self.register(m)
        await self.controller.start()

    async def close(self) -> None:
        """Stop the cluster, or, once `hand_over` was called, leave it running for the standby
        that leads now."""
        await self.controller.close(hand_over=self.handing_over)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, self.cluster.detach if self.handing_over else self.cluster.close)

    def hand_over(self) -> None:
        """A standby takes over: at shutdown the cluster stays running (see `close`)."""
        self.handing_over = True

    def prepare(self) -> None:
        """Load the initial models' tokenizers now (a standby does this before it leads)."""
        for m in self.initial_models:
            self._prepared[m.name] = (m.path, Tokenizer.from_dir(m.path))

    async def register(self, entry: ModelConfigEntry) -> None:
        path, tok = self._prepared.pop(entry.name, (None, None))
        self.tokenizers[entry.name] = tok if path == entry.path else Tokenizer.from_dir(entry.path)
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
        return dashboard_admin_ok(gw.admin_token, request)

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True, "exec_type": gw.exec_type, "models": list(gateway.tokenizers)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    add_extra_routes(app, gateway)  # /v1/models, /tokenize, /detokenize, /version
    add_dashboard_routes(app, gateway)  # /dashboard, /admin/status, /admin/coldstarts

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await generate(gateway, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        return await generate(gateway, body, chat=True)

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
