"""The node storage agent: pulls images from the remote store into shared memory.

One agent runs on every (emulated) GPU server. On a prefetch order it creates a shared-memory
region ``[counter: u64 LE][image bytes]`` and fills it over ``streams`` HTTP range connections,
chunk by chunk in order (received in threads, ``recv_into`` straight into the region, paced by
large grants of the NIC link), the counter at the number of *contiguous* image bytes in. A worker
attaches (even before the fetch ends) and loads each tensor once the counter passes its end.
A node's fetches share its NIC fairly; a cut connection resumes from the last byte in. Whole-model
(``full``) images may stay cached after their readers leave, LRU within the budget. HTTP API:

  GET    /health
  POST   /prefetch   {"model", "kind", "p", "rank"}  -> region (idempotent per image)
  POST   /attach     same body (+ "pid") -> region, and counts the caller as a reader
  POST   /release    {"id", "pid"} -> the caller is done; the region is freed when no reader is
                                   left (a cached whole model stays, evictable); readers whose
                                   process died are released by the agent itself
  GET    /regions, GET /regions/{id}, DELETE /regions/{id}
  GET    /fetches    the regions, then the latest freed ones (as they were when freed): what
                     each fetch moved, for the operator's view
  GET    /cache      the models this node holds whole

A region is described as {"id", "shm", "offset": 0, "length", "state", "received", ...}:
``shm`` is the segment name; its first 8 bytes are the counter, the image follows.
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import secrets
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import aiohttp
from aiohttp import web

from hydraserve.store.bandwidth import Link
from hydraserve.store.server import json_error
from hydraserve.store.image import ImageKind, ImageSpec
from hydraserve.store.rangeget import HTTPStatusError, RangeConnection

log = logging.getLogger("hydraserve.agent")

COUNTER = 8  # bytes of the received-bytes counter at the start of every region
FREED_KEPT = 128  # freed regions /fetches still describes
CHUNK_S = 0.04  # on a limited NIC a chunk is this much of its rate ...
MIN_CHUNK = 2**20  # ... but at least this many bytes
SHM_PREFIX = "hs_"  # every region's segment is named hs_<agent pid>_<random>


class RegionState(enum.Enum):
    FETCHING = "fetching"
    READY = "ready"
    FAILED = "failed"


class FetchError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Region:
    id: str
    spec: ImageSpec
    size: int
    shm: shared_memory.SharedMemory
    state: RegionState = RegionState.FETCHING
    readers: int = 0
    reader_pids: dict[int, int] = field(default_factory=dict)  # pid -> attachments
    cached: bool = False
    error: str | None = None
    received: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stop: threading.Event = field(default_factory=threading.Event)  # tells receiving threads

    def set_received(self, n: int) -> None:
        self.received = n
        struct.pack_into("<Q", self.shm.buf, 0, n)

    def describe(self) -> dict:
        secs = (self.finished or time.monotonic()) - self.started
        return {"id": self.id, "shm": self.shm.name, "offset": 0, "length": self.size,
                "state": self.state.value, "received": self.received, "readers": self.readers,
                "cached": self.cached, "error": self.error, **self.spec.to_dict(),
                "seconds": round(secs, 4),
                "gbps": round(self.received * 8 / 1e9 / secs, 4) if secs > 0 else None}


@dataclass(frozen=True)
class AgentConfig:
    node: str
    remote: str  # base URL of the remote store
    nic_gbps: float | None = None  # None: unlimited
    cache_gb: float = 0.0
    streams: int = 2
    chunk_mb: float = 64.0
    token: str | None = None  # the cluster token: sent to the store
    retries: int = 5  # a cut connection is retried at least this many times ...
    retry_s: float = 30.0  # ... and for as long as this (a store restarting takes seconds)


class Agent:
    """Owns every region of one node; all methods run on the agent's event loop."""

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.nic = Link(cfg.nic_gbps)
        self.regions: dict[str, Region] = {}
        self.freed: deque[dict] = deque(maxlen=FREED_KEPT)  # describe() of freed regions
        self.by_key: dict[str, Region] = {}
        self.session: aiohttp.ClientSession | None = None
        # receiving threads: one per stream of every fetch in flight, each blocked in recv_into
        self.receivers = ThreadPoolExecutor(max_workers=64, thread_name_prefix="hs-recv")

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.cfg.token}"} if self.cfg.token else None,
            connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30))

    async def close(self) -> None:
        for r in list(self.regions.values()):
            self._free(r)
        if self.session:
            await self.session.close()
        self.receivers.shutdown(wait=False, cancel_futures=True)

    # -- regions -----------------------------------------------------------------------------
    @staticmethod
    def _path(spec: ImageSpec) -> str:
        return f"/models/{spec.model}/image?kind={spec.kind.value}&p={spec.p}&rank={spec.rank}"

    def _url(self, spec: ImageSpec) -> str:
        return self.cfg.remote.rstrip("/") + self._path(spec)

    async def _size(self, spec: ImageSpec) -> int:
        async with self.session.head(self._url(spec)) as resp:
            if resp.status != 200:
                text = await self._error_text(spec)
                raise FetchError(resp.status if resp.status < 500 else 502, text)
            return int(resp.headers["Content-Length"])

    async def _error_text(self, spec: ImageSpec) -> str:
        async with self.session.get(self._url(spec)) as resp:
            try:
                return (await resp.json())["error"]
            except (ValueError, KeyError, aiohttp.ContentTypeError):
                return f"remote store answered {resp.status}"

    async def prefetch(self, spec: ImageSpec) -> Region:
        region = self.by_key.get(spec.key)
        if region is not None and region.state is not RegionState.FAILED:
            region.last_used = time.monotonic()
            return region
        if region is not None:
            self._free(region)
        size = await self._size(spec)
        region = self.by_key.get(spec.key)  # another order for it may have won the race
        if region is not None:
            return region
        # the agent's pid in the name: whoever restarts a killed agent can free what it left
        shm = shared_memory.SharedMemory(name=f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(6)}",
                                         create=True,
                                         size=COUNTER + max(size, 1))
        region = Region(secrets.token_hex(6), spec, size, shm)
        region.set_received(0)
        region.cached = spec.kind is ImageKind.FULL and self._make_room(size)
        self.regions[region.id] = region
        self.by_key[spec.key] = region
        region.task = asyncio.create_task(self._fetch(region))
        log.info("node %s: prefetch %s (%d bytes) into %s", self.cfg.node, spec.key, size, shm.name)
        return region

    def _make_room(self, size: int) -> bool:
        """Evict least recently used idle cached models until ``size`` fits the cache budget."""
        budget = self.cfg.cache_gb * 1e9
        if size > budget:
            return False
        cached = [r for r in self.regions.values() if r.cached]
        used = sum(r.size for r in cached)
        for victim in sorted(cached, key=lambda r: r.last_used):
            if used + size <= budget:
                break
            if victim.readers == 0 and victim.state is not RegionState.FETCHING:
                log.info("node %s: evict cached %s", self.cfg.node, victim.spec.model)
                used -= victim.size
                self._free(victim)
        return used + size <= budget

    def attach(self, region: Region, pid: int | None = None) -> Region:
        region.readers += 1
        if pid:
            region.reader_pids[pid] = region.reader_pids.get(pid, 0) + 1
        region.last_used = time.monotonic()
        return region

    def release(self, region: Region, pid: int | None = None, count: int = 1) -> None:
        if pid and pid in region.reader_pids:
            region.reader_pids[pid] -= count
            if region.reader_pids[pid] <= 0:
                del region.reader_pids[pid]
        region.readers = max(0, region.readers - count)
        region.last_used = time.monotonic()
        if region.readers == 0 and not (region.cached and region.state is not RegionState.FAILED):
            self._free(region)

    def reap(self) -> None:
        """Release what reader processes that died without releasing still held (a killed
        worker must not keep a region, or its fetch, alive)."""
        for region in list(self.regions.values()):
            for pid, count in list(region.reader_pids.items()):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    log.info("node %s: reader %d of %s is gone; releasing", self.cfg.node, pid,
                             region.spec.key)
                    self.release(region, pid, count)
                except PermissionError:
                    pass  # alive, owned by someone else

    async def reap_forever(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.reap()

    def _free(self, region: Region) -> None:
        region.stop.set()
        if region.task and not region.task.done():
            region.task.cancel()
        if self.regions.pop(region.id, None) is not None:
            self.freed.append(region.describe())
        if self.by_key.get(region.spec.key) is region:
            del self.by_key[region.spec.key]
        try:
            region.shm.close()
            region.shm.unlink()
        except FileNotFoundError:
            pass
        except BufferError:  # a view is still alive in this process; unlink the name anyway
            region.shm.unlink()

    # -- fetching ----------------------------------------------------------------------------
    def _chunk_bytes(self, size: int) -> int:
        """One range request's bytes for an image of ``size``. Unlimited NIC: equal chunks of
        at most ``chunk_mb``, as many as a multiple of the streams (no stream ends alone with a
        last chunk). Limited NIC: ~`CHUNK_S` of its rate (at least `MIN_CHUNK`), so the prefix
        the loader follows grows smoothly and the last tensors wait for little more."""
        most = max(64 * 1024, int(self.cfg.chunk_mb * 2**20))
        if self.nic.bytes_per_s is not None:
            return int(min(most, max(MIN_CHUNK, self.nic.bytes_per_s * CHUNK_S)))
        streams = max(1, self.cfg.streams)
        n = max(1, -(-size // most))
        balanced = -(-n // streams) * streams
        n = balanced if size // balanced >= MIN_CHUNK else n  # short images: no finer split
        return max(1, -(-size // n))

    async def _fetch(self, region: Region) -> None:
        chunk = self._chunk_bytes(region.size)
        spans = [(s, min(s + chunk, region.size)) for s in range(0, region.size, chunk)]
        got = [0] * len(spans)
        order = iter(range(len(spans)))
        first_open = 0
        lock = threading.Lock()  # receiving threads report concurrently

        def advance(i: int, n: int) -> None:
            """``n`` more bytes of span i are in: move the counter over what is contiguous."""
            nonlocal first_open
            with lock:
                got[i] += n
                while first_open < len(spans) and \
                        got[first_open] == spans[first_open][1] - spans[first_open][0]:
                    first_open += 1
                done = first_open == len(spans)
                region.set_received(region.size if done else spans[first_open][0] + got[first_open])

        async def stream() -> None:
            conn = RangeConnection(self.cfg.remote, self.cfg.token)  # kept alive across spans
            try:
                for i in order:
                    await self._fetch_span(region, spans[i], i, got, advance, conn)
            finally:
                conn.close()  # also stops a thread still receiving after a cancellation

        try:
            await asyncio.gather(*(stream() for _ in range(max(1, self.cfg.streams))))
            region.state = RegionState.READY
            region.finished = time.monotonic()
            log.info("node %s: %s ready, %.1f MB in %.2f s", self.cfg.node, region.spec.key,
                     region.size / 1e6, region.finished - region.started)
        except asyncio.CancelledError:
            region.stop.set()
            raise
        except Exception as e:  # noqa: BLE001 - any failure marks the region failed
            region.stop.set()
            region.state, region.error = RegionState.FAILED, str(e)
            region.finished = time.monotonic()
            log.error("node %s: fetch of %s failed: %s", self.cfg.node, region.spec.key, e)
        finally:
            region.done.set()

    async def _fetch_span(self, region: Region, span: tuple[int, int], i: int, got: list[int],
                          advance, conn: RangeConnection) -> None:
        """Receive one span into the region over ``conn`` (in a receiving thread), resuming
        from the last byte in after a cut."""
        start, end = span
        failures, failing_since, failed_at = 0, 0.0, -1
        loop = asyncio.get_running_loop()
        path = self._path(region.spec)
        while got[i] < end - start:
            pos = start + got[i]
            view = region.shm.buf[COUNTER + pos:COUNTER + end]
            try:
                await loop.run_in_executor(self.receivers, conn.get_into, path, pos, view,
                                           self.nic, lambda n: advance(i, n), region.stop)
            except HTTPStatusError as e:
                raise FetchError(e.status if e.status < 500 else 502,
                                 f"remote store answered {e.status}: {e}") from None
            except OSError as e:  # a cut, a reset, a timeout, a refused reconnection
                if region.stop.is_set():
                    raise
                pos = start + got[i]
                now = time.monotonic()
                if pos != failed_at:  # bytes came since the last cut: a new run of failures
                    failures, failing_since, failed_at = 0, now, pos
                failures += 1
                if failures > self.cfg.retries and now - failing_since > self.cfg.retry_s:
                    raise
                log.warning("node %s: connection for %s cut at byte %d (%s); resuming",
                            self.cfg.node, region.spec.key, pos, e)
                await asyncio.sleep(min(1.0, 0.05 * 2 ** failures))
            finally:
                view.release()



def make_app(cfg: AgentConfig) -> web.Application:
    agent = Agent(cfg)
    app = web.Application()
    app["agent"] = agent

    async def on_startup(app: web.Application) -> None:
        await agent.start()
        app["reaper"] = asyncio.create_task(agent.reap_forever())

    async def on_cleanup(app: web.Application) -> None:
        app["reaper"].cancel()
        await agent.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)

    async def spec_of(request: web.Request) -> ImageSpec:
        try:
            return ImageSpec.from_dict(await request.json())
        except (ValueError, TypeError, AttributeError) as e:
            raise web.HTTPBadRequest(text=json.dumps({"error": f"bad image spec: {e}"}),
                                     content_type="application/json")

    async def ordered(request: web.Request, attach: bool) -> web.Response:
        spec = await spec_of(request)
        try:
            pid = int((await request.json()).get("pid") or 0)
        except (ValueError, TypeError):
            return json_error(400, "pid must be an integer")
        try:
            region = await agent.prefetch(spec)
        except FetchError as e:
            return json_error(e.status, e.args[0])
        except aiohttp.ClientError as e:
            return json_error(502, f"remote store unreachable: {e}")
        if attach:
            agent.attach(region, pid)
        return web.json_response(region.describe())

    async def prefetch(request: web.Request) -> web.Response:
        return await ordered(request, attach=False)

    async def attach(request: web.Request) -> web.Response:
        return await ordered(request, attach=True)

    def region_of(request: web.Request, rid: str | None) -> Region:
        region = agent.regions.get(str(rid))
        if region is None:
            raise web.HTTPNotFound(text=json.dumps({"error": f"no region {rid!r}"}),
                                   content_type="application/json")
        return region

    async def release(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            rid, pid = body["id"], int(body.get("pid") or 0)
        except (ValueError, KeyError, TypeError):
            return json_error(400, 'body must be {"id": REGION[, "pid": PID]}')
        region = region_of(request, rid)
        agent.release(region, pid)
        return web.json_response(region.describe())

    async def regions(_: web.Request) -> web.Response:
        return web.json_response({"regions": [r.describe() for r in agent.regions.values()]})

    async def fetches(_: web.Request) -> web.Response:
        return web.json_response({"fetches": [r.describe() for r in agent.regions.values()]
                                  + list(reversed(agent.freed))})

    async def region(request: web.Request) -> web.Response:
        r = region_of(request, request.match_info["id"])
        if request.query.get("wait") == "1":
            await r.done.wait()
        return web.json_response(r.describe())

    async def delete(request: web.Request) -> web.Response:
        r = region_of(request, request.match_info["id"])
        if r.readers:
            return json_error(409, f"region {r.id} has {r.readers} reader(s)")
        agent._free(r)
        return web.json_response({"deleted": r.id})

    async def cache(_: web.Request) -> web.Response:
        held = [r for r in agent.regions.values() if r.cached and r.state is RegionState.READY]
        return web.json_response({"node": cfg.node, "models": sorted(r.spec.model for r in held),
                                  "bytes": sum(r.size for r in held),
                                  "budget_bytes": int(cfg.cache_gb * 1e9)})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node": cfg.node, "nic_gbps": agent.nic.gbps,
                                  "regions": len(agent.regions), "remote": cfg.remote})

    app.router.add_get("/health", health)
    app.router.add_post("/prefetch", prefetch)
    app.router.add_post("/attach", attach)
    app.router.add_post("/release", release)
    app.router.add_get("/regions", regions)
    app.router.add_get("/fetches", fetches)
    app.router.add_get("/regions/{id}", region)
    app.router.add_delete("/regions/{id}", delete)
    app.router.add_get("/cache", cache)
    return app
