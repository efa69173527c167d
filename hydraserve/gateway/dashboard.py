"""The operator's routes: a status page and the JSON behind it, and the cold-start records.

  GET /dashboard              the status page (static HTML and a little script, no external
                              resource); with an admin token, open it as /dashboard?token=T
  GET /admin/status           what the page shows: models, servers, instances, cold starts
  GET /admin/coldstarts       the latest cold starts (?n=, default 20), newest first
  GET /admin/coldstarts/{id}  one cold start (its id is the instance's, as the
                              X-HydraServe-Cold-Start header of an answer names it)

All need the admin token when one is configured (the page: as ?token= or a Bearer header).
"""
from __future__ import annotations

import secrets
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse

from hydraserve.control.instance import InstanceState
from hydraserve.gateway.openai_api import error

if TYPE_CHECKING:
    from hydraserve.gateway.app import Gateway


def admin_ok(token: str | None, request: HTTPRequest, query: bool = False) -> bool:
    """Whether ``request`` carries the admin token (always, when none is configured);
    ``query``: a ?token= parameter counts too (a page opened in a browser)."""
    if not token:
        return True
    auth = request.headers.get("authorization", "")
    if secrets.compare_digest(auth.encode(), f"Bearer {token}".encode()):
        return True
    given = request.query_params.get("token", "") if query else ""
    return bool(given) and secrets.compare_digest(given.encode(), token.encode())


def _page() -> str:
    return resources.files("hydraserve.gateway").joinpath("static/dashboard.html").read_text(
        encoding="utf-8")


def status(gateway: "Gateway") -> dict:
    c = gateway.controller
    models = []
    for name, ep in c.models().items():
        models.append({"name": name, "queued": len(ep.queue), "cold_starts": ep.cold_starts,
                       "ready": sum(i.state is InstanceState.READY for i in ep.instances),
                       "starting": sum(i.state is InstanceState.STARTING
                                       for i in ep.instances)})
    return {"exec_type": gateway.gw.exec_type, "models": models,
            "instances": [i.describe() for i in c.list_instances()],
            "servers": c.view.resources(),
            "cold_starts": [r.to_json() for r in c.view.cold_starts(8)]}


def add_dashboard_routes(app: FastAPI, gateway: "Gateway") -> None:
    token = gateway.gw.admin_token

    def refused():
        return error(401, "admin token required", "authentication_error")

    @app.get("/dashboard")
    async def dashboard(request: HTTPRequest):
        if not admin_ok(token, request, query=True):
            return refused()
        return HTMLResponse(_page(), headers={"Cache-Control": "no-store"})

    @app.get("/admin/status")
    async def admin_status(request: HTTPRequest):
        if not admin_ok(token, request):
            return refused()
        return status(gateway)

    @app.get("/admin/coldstarts")
    async def cold_starts(request: HTTPRequest, n: int = 20):
        if not admin_ok(token, request):
            return refused()
        return {"cold_starts": [r.to_json() for r in
                                gateway.controller.view.cold_starts(max(1, min(n, 64)))]}

    @app.get("/admin/coldstarts/{iid}")
    async def cold_start(iid: str, request: HTTPRequest):
        if not admin_ok(token, request):
            return refused()
        rec = gateway.controller.view.cold_start(iid)
        if rec is None:
            return error(404, f"no cold start {iid!r} is on record (the latest 64 are)",
                         "not_found_error")
        return rec.to_json()
