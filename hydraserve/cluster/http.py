"""The control plane's HTTP side for backends whose workers, agents and store serve HTTP
(local processes, Kubernetes pods): a `WorkerClient` over a worker's control API and the calls
to agents and the store, on one aiohttp session opened on the control plane's loop."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp

from hydraserve.cluster.base import WorkerError
from hydraserve.protocol import (ErrorEvent, GenerateRequest, Peer, ProtocolError, TokenEvent,
                                 WorkerHealth, parse_event)

LONG_POLL_S = 30.0  # one /health?wait= call at most (a proxy's idle timeout stays far)


class HttpApi:
    """JSON calls on one lazily opened aiohttp session (it must live on the running loop)."""

    def __init__(self, token: str | None = None) -> None:
        """``token``: the cluster token, sent with every call (see store.server.require_token)."""
        self._headers = {"Authorization": f"Bearer {token}"} if token else None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), headers=self._headers)
            self._loop = loop  # a session belongs to one loop (a test may run several)
        return self._session

    async def post(self, url: str, body: dict | None = None) -> dict:
        return await self._call("POST", url, body or {})

    async def get(self, url: str) -> dict:
        return await self._call("GET", url, None)

    async def _call(self, method: str, url: str, body: dict | None) -> dict:
        """The decoded answer; an error status or a broken connection is a `WorkerError`
        (503 when nothing answered)."""
        try:
            async with self.session.request(method, url, json=body) as resp:
                out = await resp.json(content_type=None)
                if resp.status >= 400:
                    err = out.get("error", out) if isinstance(out, dict) else out
                    raise WorkerError(f"{method} {url}: {resp.status} {err}", resp.status)
                return out
        except (aiohttp.ClientError, ValueError) as e:
            raise WorkerError(f"{method} {url}: {type(e).__name__}: {e}", 503) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpServices:
    """The calls on a cluster's model store and storage agents, for a backend that has ``_api``
    (an `HttpApi`), ``nodes()``, ``store_url()`` and ``agent_url(node)``."""

    _api: HttpApi

    async def layout(self, model: str, p: int) -> list[tuple[int, int]]:
        body = await self._api.get(f"{self.store_url()}/models/{model}/layout?p={p}")
        return [tuple(s["layers"]) for s in body["stages"]]

    async def prefetch(self, node: str, model: str, kind: str, p: int, rank: int) -> None:
        await self._api.post(self.agent_url(node) + "/prefetch",
                             {"model": model, "kind": kind, "p": p, "rank": rank})

    async def cached_models(self, node: str) -> set[str]:
        return set((await self._api.get(self.agent_url(node) + "/cache")).get("models", ()))

    async def fetch_stats(self, node: str, model: str, kind: str, p: int,
                          rank: int) -> dict | None:
        fetches = (await self._api.get(self.agent_url(node) + "/fetches"))["fetches"]
        r = next((r for r in fetches if r.get("model") == model and r.get("kind") == kind
                  and (kind == "full" or (r.get("p") == p and r.get("rank") == rank))), None)
        if r is None:
            return None
        return {"length": r["length"], "received": r["received"], "seconds": r["seconds"],
                "done": r["state"] != "fetching"}

    async def warm_cache(self, model: str) -> None:
        """Every node's agent pulls ``model`` whole into its host cache; returns when all have it."""
        await asyncio.gather(*(self.prefetch(s.name, model, "full", 1, 0) for s in self.nodes()))
        for s in self.nodes():
            url = self.agent_url(s.name)
            for r in (await self._api.get(url + "/regions"))["regions"]:
                if r["model"] == model:
                    await self._api.get(f"{url}/regions/{r['id']}?wait=1")


class HttpWorker:
    """`WorkerClient` of a worker serving its control API at ``url``."""

    def __init__(self, api: HttpApi, url: str, host: str = "127.0.0.1"):
        self.api, self.url, self.host = api, url, host

    async def health(self) -> WorkerHealth:
        return _health(await self.api.get(self.url + "/health"))

    async def wait_for(self, event: str, timeout: float) -> WorkerHealth:
        """Long-poll /health until ``event`` is on the worker's timeline, the worker failed or
        stopped, or ``timeout`` seconds passed; the health it answered last."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = max(0.0, deadline - loop.time())
            h = _health(await self.api.get(
                f"{self.url}/health?wait={event}&timeout={min(left, LONG_POLL_S):.3f}"))
            if h.settled(event) or loop.time() >= deadline:
                return h

    async def init(self, peers: list[Peer]) -> None:
        await self.api.post(self.url + "/init", {"peers": [p.to_json() for p in peers]})

    async def consolidate(self) -> None:
        await self.api.post(self.url + "/consolidate")

    async def stop(self) -> None:
        await self.api.post(self.url + "/stop")

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent | ErrorEvent]:
        try:
            async with self.api.session.post(self.url + "/generate", json=req.to_json()) as resp:
                if resp.status != 200:
                    out = await resp.json(content_type=None)
                    raise WorkerError(str(out.get("error", resp.status)), resp.status)
                async for line in resp.content:
                    if line.strip():
                        yield parse_event(json.loads(line))
        except aiohttp.ClientError as e:
            raise WorkerError(f"the stream from {self.url} broke: {e}", 503) from None


def _health(body: dict) -> WorkerHealth:
    try:
        return WorkerHealth.from_json(body)
    except ProtocolError as e:
        raise WorkerError(f"a worker answered an unreadable health: {e}", 502) from None
