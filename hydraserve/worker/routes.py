"""The control API every worker serves -- ours and the vLLM one -- so that the control plane
treats them alike (see api.py for what each route does)."""
from __future__ import annotations

from aiohttp import web

MAX_WAIT_S = 300.0  # the longest long-poll of /health


def add_control_routes(app: web.Application, *, health, init, generate, consolidate,
                       stop) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/stats", health)
    app.router.add_post("/init", init)
    app.router.add_post("/generate", generate)
    app.router.add_post("/consolidate", consolidate)
    app.router.add_post("/stop", stop)


def health_route(worker):
    """GET /health of ``worker`` (ours or the vLLM one: each has ``timeline``, ``state``,
    ``error`` and ``health()``): answer now, or with ?wait=EVENT once EVENT is on its timeline,
    it failed or stopped, or the timeout passed."""
    async def health(request: web.Request) -> web.Response:
        event, timeout = wait_query(request)
        if event:
            await worker.timeline.wait(event, timeout,
                                       lambda: worker.state.final or worker.error is not None)
        return web.json_response(worker.health().to_json())

    return health


def wait_query(request: web.Request) -> tuple[str | None, float]:
    """The event a /health long-poll waits for (None: answer now) and for how long at most."""
    try:
        timeout = min(max(float(request.query.get("timeout", 30)), 0.0), MAX_WAIT_S)
    except ValueError:
        raise web.HTTPBadRequest(text="timeout must be a number of seconds") from None
    return request.query.get("wait") or None, timeout
