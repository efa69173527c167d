"""The control API every worker serves -- ours and the vLLM one -- so that the control plane
treats them alike (see api.py for what each route does)."""
from __future__ import annotations

from aiohttp import web


def add_control_routes(app: web.Application, *, health, init, generate, consolidate,
                       stop) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/stats", health)
    app.router.add_post("/init", init)
    app.router.add_post("/generate", generate)
    app.router.add_post("/consolidate", consolidate)
    app.router.add_post("/stop", stop)
