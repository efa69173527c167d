"""What the control plane's parts share: the endpoints and instances, the GPU and NIC ledgers,
the requests being served, the wake-up of the reconcile loop and its background tasks.

The parts (`router`, `placer`, `fleet`, `consolidation`) each hold this one object; none
holds another's private state, and the `Controller` wires them together."""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hydraserve.cluster.base import ClusterBackend
from hydraserve.config import ClusterConfig, GatewayConfig, ModelConfigEntry
from hydraserve.control.coldstart import ColdStart, ColdStarts, StageTrace
from hydraserve.control.gpu import GpuLedger
from hydraserve.control.instance import Instance, InstanceState, Request, Stage
from hydraserve.control.lifecycle import LifecycleLog
from hydraserve.control.network import NicLedger
from hydraserve.control.presets import Preset
from hydraserve.engine.config import EngineConfig  # torch-free

KV_BLOCK_SIZE = EngineConfig.block_size  # the workers' block size (WorkerSpec's default)
DUE_EARLY_S = 1e-3  # an endpoint is reconciled from this long before a deadline (float safety)

log = logging.getLogger("hydraserve.control")


class QueueFull(Exception):
    """No free slot and a full queue: the request is refused (429)."""


class Draining(Exception):
    """The server is shutting down and takes no new request (503)."""


@dataclass
class Endpoint:
    """One servable model: its queue, its instances and its counters."""

    entry: ModelConfigEntry
    size_gb: float  # in the cluster's (paper) units
    num_kv_blocks: int
    queue: list[Request] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    layouts: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    cold_starts: int = 0
    refused: int = 0  # requests turned away: no free slot and a full queue
    cancelled: int = 0  # requests whose client went away before they ended
    resumed: int = 0  # streams placed again after their instance was lost mid-stream
    # The reconcile loop's bookkeeping (see `ControlState.touch`): something its reconcile
    # reads changed since the last one; the last one left instances wanted (placement is
    # tried again each tick); the clock time from which a queued request may time out or an
    # idle instance outlive its keep-alive (a little early: the reconcile decides exactly).
    changed: bool = field(default=True, repr=False)
    wanting: bool = field(default=False, repr=False)
    due: float = field(default=math.inf, repr=False)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def kv_tokens(self) -> int:
        """Tokens one worker's KV cache holds (a sequence longer than this cannot run)."""
        return self.num_kv_blocks * KV_BLOCK_SIZE


class ControlState:
    def __init__(self, cluster: ClusterBackend, cluster_cfg: ClusterConfig, gw: GatewayConfig,
                 preset: Preset, clock: Callable[[], float],
                 lifecycle_clock: Callable[[], float]):
        self.cluster, self.cluster_cfg, self.gw, self.preset = cluster, cluster_cfg, gw, preset
        self.clock = clock
        self.gpus = GpuLedger(cluster.gpu_budgets(), share=preset.share_gpus and cluster_cfg.share)
        self.nics = NicLedger({s.name: s.nic_gbps for s in cluster_cfg.servers})
        self.endpoints: dict[str, Endpoint] = {}
        self.watched: dict[str, Endpoint] = {}  # the endpoints a tick may have to reconcile
        self._order: dict[str, int] = {}  # registration order (the endpoints dict's)
        self._ranks = itertools.count()
        self.instances: dict[str, Instance] = {}
        self.cached: dict[str, set[str]] = {s.name: set() for s in cluster_cfg.servers}
        self.serving: dict[str, Request] = {}  # by id: dispatched and not finished
        self.closing = False
        self.draining = False
        self.handing_over = False  # a standby leads now (`Controller.begin_drain`)
        self.lifecycle = LifecycleLog(gw.lifecycle_log, lifecycle_clock) \
            if gw.lifecycle_log else None
        self.coldstarts = ColdStarts()
        self.observers: list[Callable[[str, dict], None]] = []  # see emit
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()

    def new_id(self, model: str) -> str:
        return f"{model}-{next(self._ids)}"

    def ids_from(self, n: int) -> None:
        """Number new instances from ``n`` on (past those a predecessor made)."""
        self._ids = itertools.count(n)

    def wake(self) -> None:
        """Run the reconcile loop now (something changed)."""
        self._wake.set()

    def touch(self, ep: Endpoint | None) -> None:
        """Something ``ep``'s reconcile reads changed (its queue, a request's cancellation or
        requeueing, an instance's state, load, capacity, last use or consolidation, its
        instances): the next tick reconciles it. Every such change must call this; an
        endpoint left untouched is reconciled again only when it still wants instances or
        when a timeout or keep-alive may expire (`Endpoint.due`). It does not wake the loop."""
        if ep is not None:
            ep.changed = True
            self.watched[ep.name] = ep

    def touch_model(self, model: str) -> None:
        self.touch(self.endpoints.get(model))

    def put_endpoint(self, ep: Endpoint) -> None:
        """Register ``ep``; one of the same name is replaced and keeps its place in order."""
        if ep.name not in self.endpoints:
            self._order[ep.name] = next(self._ranks)
        self.endpoints[ep.name] = ep
        self.touch(ep)

    def drop_endpoint(self, name: str) -> Endpoint:
        self.watched.pop(name, None)
        self._order.pop(name, None)
        return self.endpoints.pop(name)

    def due(self, now: float) -> list[tuple[Endpoint, bool]]:
        """The endpoints whose reconcile may do something now, in registration order, each
        with whether the only thing it may do is to place the instances it still wants; those
        it may not do anything for until touched leave the watch."""
        due = []
        for name, ep in list(self.watched.items()):
            if self.endpoints.get(name) is not ep:
                del self.watched[name]  # unregistered or replaced (the new one is touched)
            elif ep.changed or now >= ep.due:
                due.append((ep, False))
            elif ep.wanting:
                due.append((ep, True))
            elif ep.due == math.inf:
                del self.watched[name]
        due.sort(key=lambda d: self._order[d[0].name])
        return due

    def due_at(self, ep: Endpoint, keep_alive_s: float) -> float:
        """`DUE_EARLY_S` before the first of ``ep``'s queued requests may time out or of its
        idle instances outlive ``keep_alive_s``, as things are now (inf: none can)."""
        at = math.inf
        if ep.queue:
            at = min(r.queued_at for r in ep.queue) + self.gw.queue_timeout_s
        for i in ep.instances:
            if i.state is InstanceState.READY and i.active == 0 and not i.consolidating:
                at = min(at, i.last_used + keep_alive_s)
        return at - DUE_EARLY_S

    async def woken(self, timeout: float) -> None:
        """Until `wake` or ``timeout`` seconds (the tick), then re-arm."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=timeout)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    def spawn(self, coro) -> asyncio.Task:
        """A background task the control plane owns (cancelled at close)."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def log(self, event: str, **fields) -> None:
        if self.lifecycle:
            self.lifecycle.write(event, **fields)

    def emit(self, event: str, **fields) -> None:
        """An event for the operator's view (the gateway's metrics observe it) and the
        lifecycle log: "cold_start" (a record, at its first token), "fetch" (server, bytes,
        seconds), "consolidation" (model, outcome, seconds), "failure" (kind, model)."""
        self.log(event, **fields)
        for observe in self.observers:
            try:
                observe(event, fields)
            except Exception:  # noqa: BLE001 - an observer must not break the control plane
                log.exception("an observer of %s failed", event)

    def open_cold_start(self, ep: Endpoint, inst: Instance) -> ColdStart:
        """The record of ``inst``'s start; the queued requests it takes first (up to its
        capacity) are tagged with it, and the first of them is the one it was started for."""
        pl = inst.placement
        rec = self.coldstarts.add(ColdStart(
            inst.id, ep.name, self.gw.exec_type, pl.p, pl.policy,
            None if pl.predicted_ttft_ms is None else pl.predicted_ttft_ms / 1000,
            pl.from_cache, inst.created,
            [StageTrace(st.rank, st.node, st.claim.gpu, st.all_card) for st in inst.stages],
            timeline=inst.timeline))
        waiting = self.tag_waiting(ep, inst)
        if waiting:
            rec.arrival = min(r.arrival for r in waiting)
        return rec

    def tag_waiting(self, ep: Endpoint, inst: Instance) -> list[Request]:
        """Tag the queued requests that a starting ``inst`` will take first (those without a
        cold start yet, up to its free capacity) with it; the ones tagged now."""
        taken = sum(1 for r in ep.queue if r.cold_start == inst.id)
        waiting = [r for r in ep.queue if r.cold_start is None][:max(0, inst.capacity - taken)]
        for r in waiting:
            r.cold_start = inst.id
            r.placed.set()
        return waiting

    def add(self, ep: Endpoint, inst: Instance) -> None:
        ep.instances.append(inst)
        self.instances[inst.id] = inst
        self.touch(ep)

    def remove(self, inst: Instance) -> None:
        ep = self.endpoints.get(inst.model)
        if ep is not None and inst in ep.instances:
            ep.instances.remove(inst)
        self.instances.pop(inst.id, None)
        self.touch(ep)

    def release_fetch(self, stage: Stage) -> None:
        """Drop a stage's NIC booking (the ledger may have completed it already)."""
        fetch, stage.fetch = stage.fetch, None
        if fetch is not None and any(f.id == fetch.id for f in self.nics.active(fetch.node)):
            self.nics.finish(fetch)
