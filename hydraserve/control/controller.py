"""The control plane's reconcile loop (asyncio, torch-free).

Per model endpoint: a FIFO queue. Every tick (and whenever something changes) the loop assigns
queued requests to ready instances with free slots, starts ceil(unserved / 8) new instances in
groups of at most 4 stages' worth when demand is not covered by instances still starting, and
stops instances idle past the keep-alive. An instance start claims GPU memory and NIC shares,
orders each stage's prefetch from its node's agent *before* the workers exist, then starts the
workers through the cluster backend and joins them with /init. A pipeline with part-card stages
consolidates as soon as it serves; its part-card GPUs are then released and its other all-card
stages become standalone instances.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hydraserve.cluster.base import ClusterBackend, WorkerError, WorkerSpec
from hydraserve.config import ClusterConfig, GatewayConfig, ModelConfigEntry
from hydraserve.control.gpu import GpuLedger
from hydraserve.control.instance import Instance, InstanceState, Request, Stage
from hydraserve.control.lifecycle import LifecycleLog
from hydraserve.control.network import NicLedger, claim_gbits, fetch_deadline
from hydraserve.control.placement import POLICIES, PolicyName, place_cached, place_static
from hydraserve.control.presets import Preset
from hydraserve.control.snapshot import (MAX_GROUP, ModelInfo, NodeSnapshot, Placement,
                                         PlacementRequest)
from hydraserve.engine.config import EngineConfig, ModelConfig, num_kv_blocks  # torch-free

KV_BLOCK_SIZE = EngineConfig.block_size  # the workers' block size (WorkerSpec's default)
LOST = ("the model's worker was lost while serving this request and it could not be placed "
        "again; details are in the server log")

log = logging.getLogger("hydraserve.control")


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclass
class Endpoint:
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

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def kv_tokens(self) -> int:
        """Tokens one worker's KV cache holds (a sequence longer than this cannot run)."""
        return self.num_kv_blocks * KV_BLOCK_SIZE


RUNTIME_CONTEXT_GB = 0.5  # real GB a pooled runtime's CUDA context holds on its GPU


def runtime_budgets(gpus: tuple[float, ...], cfg: ClusterConfig) -> list[float]:
    """A server's GPU budgets less what its warm runtimes hold: on CUDA, each pooled runtime's
    context on the first GPU (in the cluster's units); on CPU nothing."""
    out = list(gpus)
    if cfg.device == "cuda" and cfg.warm_runtimes and out:
        out[0] = max(0.0, out[0] - cfg.warm_runtimes * RUNTIME_CONTEXT_GB * cfg.scale.size_scale)
    return out


class Controller:
    def __init__(self, cluster: ClusterBackend, cluster_cfg: ClusterConfig, gw: GatewayConfig,
                 preset: Preset, clock: Callable[[], float] = time.monotonic,
                 lifecycle_clock: Callable[[], float] = time.time):
        """``clock`` (monotonic seconds) times everything the control plane decides on; the
        simulator passes its virtual-time loop's clock. ``lifecycle_clock`` stamps the
        lifecycle log (the wall clock, the replay's time axis, by default)."""
        self.cluster, self.cluster_cfg, self.gw, self.preset = cluster, cluster_cfg, gw, preset
        self.clock = clock
        self.gpus = GpuLedger({s.name: runtime_budgets(s.gpus, cluster_cfg)
                               for s in cluster_cfg.servers},
                              share=preset.share_gpus and cluster_cfg.share)
        self.nics = NicLedger({s.name: s.nic_gbps for s in cluster_cfg.servers})
        self.endpoints: dict[str, Endpoint] = {}
        self.instances: dict[str, Instance] = {}
        self.cached: dict[str, set[str]] = {s.name: set() for s in cluster_cfg.servers}
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._closing = False
        self._draining = False
        self._serving: dict[str, Request] = {}  # by id: dispatched and not finished
        self._snap: tuple[float, tuple[NodeSnapshot, ...]] | None = None  # see _snapshot
        self.lifecycle = LifecycleLog(gw.lifecycle_log, lifecycle_clock) \
            if gw.lifecycle_log else None

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self._closing = True
        if self._loop_task:
            self._loop_task.cancel()
        for t in list(self._tasks):
            t.cancel()
        for inst in list(self.instances.values()):
            await self._stop_instance(inst, InstanceState.STOPPED)
        for ep in self.endpoints.values():
            for req in ep.queue:
                req.events.put_nowait({"error": "the server is shutting down", "status": 503})
        await self.cluster.aclose()
        if self.lifecycle:
            self.lifecycle.close()

    def _log(self, event: str, **fields) -> None:
        if self.lifecycle:
            self.lifecycle.write(event, **fields)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def wake(self) -> None:
        self._wake.set()

    # -- models ------------------------------------------------------------------------------------
    def register(self, entry: ModelConfigEntry, model_cfg: ModelConfig | None = None) -> Endpoint:
        """Make a model servable (idempotent for the same entry). ``model_cfg`` stands in for
        the model directory where there is none (the simulator; then ``size_gb`` is needed)."""
        path = Path(entry.path)
        cfg = model_cfg or ModelConfig.from_dir(path)  # validates the directory; torch-free
        size = entry.size_gb
        if size is None:
            nbytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            size = nbytes * self.cluster_cfg.scale.size_scale / 1e9
        blocks = num_kv_blocks(cfg, EngineConfig(kv_cache_mb=self.gw.kv_cache_mb))
        self.cluster.register_model(entry.name, str(path))
        ep = Endpoint(entry, size, blocks)
        old = self.endpoints.get(entry.name)
        if old is not None:
            ep.queue, ep.instances = old.queue, old.instances
        self.endpoints[entry.name] = ep
        log.info("model %s registered: %.2f GB, %d KV blocks per worker", entry.name, size, blocks)
        largest = max((g for srv in self.cluster_cfg.servers for g in srv.gpus), default=0.0)
        if size > largest:
            log.warning("model %s (%.1f GB) fits on no single GPU of this cluster (the largest has "
                        "%.1f GB); placements that need the whole model on one GPU (every policy "
                        "but static(p > 1)) will find no room", entry.name, size, largest)
        return ep

    async def warm_cache(self, name: str) -> None:
        """Put the whole model in every server's host cache (ServerlessLLM with cached model)."""
        await self.cluster.warm_cache(name)
        await self._refresh_cache()

    async def unregister(self, name: str) -> None:
        ep = self.endpoints.pop(name)
        for inst in list(ep.instances):
            await self._stop_instance(inst, InstanceState.STOPPED)
        for req in ep.queue:
            req.events.put_nowait({"error": f"model {name} was removed", "status": 404})
        self.cluster.unregister_model(name)

    # -- requests ----------------------------------------------------------------------------------
    def free_slots(self, ep: Endpoint) -> int:
        """Requests the endpoint's ready and starting instances can still take."""
        return sum(max(0, i.capacity - i.active) for i in ep.instances
                   if i.state in (InstanceState.READY, InstanceState.STARTING))

    def submit(self, req: Request) -> None:
        """Admit a request: while a ready or starting instance has a free slot, or the queue
        has room (``max_queue`` beyond those slots); else `QueueFull`."""
        ep = self.endpoints[req.model]
        if self._draining:
            raise Draining("the server is shutting down")
        free = self.free_slots(ep)
        if len(ep.queue) >= self.gw.max_queue + free:
            ep.refused += 1
            raise QueueFull(f"{len(ep.queue)} requests are queued for {req.model} and its "
                            f"instances have no free slot")
        if req.params.get("temperature") and req.params.get("seed") is None:
            # sampling is stateless given (seed, i): with the seed fixed here, a stream that
            # loses its worker continues elsewhere exactly as it would have
            req.params["seed"] = secrets.randbits(62)
        ep.queue.append(req)
        self.wake()

    def cancel(self, req: Request, by_client: bool = True) -> None:
        """End a request early: its client went away, or (``by_client`` False) the gateway
        has all it wants of it (a stop string)."""
        if req.cancelled:
            return
        req.cancelled = True
        ep = self.endpoints.get(req.model)
        if by_client and ep is not None:
            ep.cancelled += 1
        if req.task is not None:
            req.task.cancel()
        self.wake()

    async def drain(self, grace_s: float) -> int:
        """Shutting down: refuse new requests, give the open ones ``grace_s`` seconds to finish,
        then end each one still open with a 503 error event. Returns how many were ended so."""
        self._draining = True
        deadline = self.clock() + grace_s
        while self.clock() < deadline and (self._serving or any(
                ep.queue for ep in self.endpoints.values())):
            await asyncio.sleep(0.05)
        ended = 0
        for ep in self.endpoints.values():
            queued, ep.queue = ep.queue, []
            for req in queued:
                req.events.put_nowait({"error": "the server is shutting down", "status": 503})
                ended += 1
        for req in list(self._serving.values()):
            self._serving.pop(req.id, None)
            req.events.put_nowait({"error": "the server is shutting down", "status": 503})
            if req.task is not None:
                req.task.cancel()
            ended += 1
        return ended

    # -- the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        last_cache_check = 0.0
        # not `while True`: on Python 3.11 wait_for can swallow a cancellation that arrives
        # as its inner wait completes, and the loop would tick on after close()
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=0.1)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            self._snap = None
            now = self.clock()
            if self.preset.cache and now - last_cache_check > 1.0:
                last_cache_check = now  # what the agents hold changes behind our back (LRU)
                self._spawn(self._refresh_cache())
            self.nics.advance(now)
            for ep in list(self.endpoints.values()):
                if not ep.queue and not ep.instances:
                    continue  # nothing to do (most endpoints, most of the time)
                try:
                    self._reconcile(ep, now)
                except Exception:  # noqa: BLE001 - one endpoint must not stop the loop
                    log.exception("reconcile of %s failed", ep.name)

    def _reconcile(self, ep: Endpoint, now: float) -> None:
        ep.queue = [r for r in ep.queue if not r.cancelled]
        for r in [r for r in ep.queue if now - r.queued_at > self.gw.queue_timeout_s]:
            ep.queue.remove(r)
            r.events.put_nowait({"error": f"no instance of {ep.name} could be started within "
                                          f"{self.gw.queue_timeout_s:.0f} s (the cluster has no "
                                          "room for it)", "status": 503})
        for inst in ep.instances:
            while ep.queue and inst.free_slots:
                self._dispatch(inst, ep.queue.pop(0))
        starting = sum(i.capacity for i in ep.instances if i.state is InstanceState.STARTING)
        unserved = len(ep.queue) - starting
        if unserved > 0:
            self._scale_up(ep, now, math.ceil(unserved / self.gw.batch_capacity))
        for inst in list(ep.instances):
            if (inst.state is InstanceState.READY and inst.active == 0 and not inst.consolidating
                    and now - inst.last_used > self.gw.keep_alive_s):
                log.info("instance %s idle for %.0f s: scaling down", inst.id, now - inst.last_used)
                self._spawn(self._stop_instance(inst, InstanceState.STOPPED))

    def _snapshot(self, now: float) -> tuple[NodeSnapshot, ...]:
        # One snapshot serves every endpoint of a tick (the reconcile loop is synchronous, so
        # only a claim in it changes the ledgers); hundreds of waiting endpoints would otherwise
        # rebuild it each.
        if self._snap is not None and self._snap[0] == now:
            return self._snap[1]
        snap = tuple(NodeSnapshot(name=s.name, gpus=self.gpus.snapshot_gpus(s.name),
                                  nic_gbps=s.nic_gbps, offered_gbps=self.nics.offered(s.name, now),
                                  cached_models=frozenset(self.cached.get(s.name, ())))
                     for s in self.cluster_cfg.servers)
        self._snap = (now, snap)
        return snap

    def placement_request(self, ep: Endpoint, now: float, wanted: int) -> PlacementRequest:
        """What placement decides on now; NIC admission books fetches from the same object, so
        both use one TTFT model (one W, one SLO, the cluster's after_fetch_ms)."""
        wait_ms = (now - ep.queue[0].queued_at) * 1000 if ep.queue else 0.0
        e = ep.entry
        return PlacementRequest(
            model=ModelInfo(e.name, ep.size_gb, e.ttft_slo_s * 1000, e.tpot_slo_ms,
                            e.profiled_tpot_ms),
            nodes=self._snapshot(now), instances_wanted=wanted, wait_ms=wait_ms,
            max_p=self.preset.max_p, after_fetch_ms=self.cluster_cfg.scale.after_fetch_ms)

    def _place(self, req: PlacementRequest) -> Placement | None:
        if self.preset.cache:
            placed = place_cached(req)
            if placed is not None:
                return placed
        if self.preset.policy is PolicyName.STATIC:
            return place_static(req, self.preset.static_p)
        return POLICIES[self.preset.policy](req)

    def _scale_up(self, ep: Endpoint, now: float, wanted: int) -> None:
        budget = MAX_GROUP
        while wanted > 0 and budget > 0:
            req = self.placement_request(ep, now, wanted)
            placement = self._place(req)
            if placement is None or placement.p > budget:
                return
            inst = self._claim(ep, placement, req, now)
            if inst is None:
                return
            wanted -= 1
            budget -= placement.p
            ep.cold_starts += 1
            self._spawn(self._start_instance(ep, inst))

    def _claim(self, ep: Endpoint, placement: Placement, req: PlacementRequest,
               now: float) -> Instance | None:
        self._snap = None  # the ledgers change below
        iid = f"{ep.name}-{next(self._ids)}"
        stages = []
        try:
            for sp in placement.stages:
                claim = self.gpus.claim(sp.node, sp.gpu, sp.reserve_gb)
                stages.append(Stage(sp.rank, sp.node, sp.all_card, claim, f"{iid}-r{sp.rank}"))
        except ValueError as e:
            log.warning("placement of %s no longer fits: %s", ep.name, e)
            for s in stages:
                self.gpus.release(s.claim)
            return None
        if not placement.from_cache:
            deadline = fetch_deadline(now, req)
            for s in stages:
                s.fetch = self.nics.book(s.node, claim_gbits(ep.size_gb, placement.p), deadline,
                                         now)
        inst = Instance(iid, ep.name, placement, stages,
                        capacity=self.gw.batch_capacity * placement.p, created=now,
                        last_used=now, clock=self.clock)
        ep.instances.append(inst)
        self.instances[iid] = inst
        self._log("created", instance=iid, model=ep.name, p=placement.p, policy=placement.policy,
                  from_cache=placement.from_cache,
                  stages=[{"rank": s.rank, "node": s.node, "gpu": s.claim.gpu, "gb": s.claim.gb,
                           "all_card": s.all_card} for s in stages])
        log.info("instance %s: p=%d on %s (%s%s)", iid, placement.p,
                 ",".join(s.node for s in stages), placement.policy,
                 ", from cache" if placement.from_cache else "")
        return inst

    # -- starting ----------------------------------------------------------------------------------
    async def _layout(self, ep: Endpoint, p: int) -> list[tuple[int, int]]:
        if p not in ep.layouts:
            ep.layouts[p] = await self.cluster.layout(ep.name, p)
        return ep.layouts[p]

    async def _start_instance(self, ep: Endpoint, inst: Instance) -> None:
        p = inst.placement.p
        try:
            layers = await self._layout(ep, p)
            for s in inst.stages:
                s.layers = layers[s.rank]
            if self.preset.prefetch:
                inst.mark("prefetch_started")
                kind = "full" if p == 1 else "stage"
                await asyncio.gather(*(self.cluster.prefetch(s.node, ep.name, kind, p, s.rank)
                                       for s in inst.stages))
            for s in inst.stages:
                spec = WorkerSpec(worker_id=s.worker_id, model=ep.name, node=s.node, rank=s.rank,
                                  p=p, layers=s.layers, all_card=s.all_card,
                                  num_kv_blocks=ep.num_kv_blocks, device=self.cluster_cfg.device,
                                  # on GPUs half precision, as the memory claims assume
                                  dtype="float16" if self.cluster_cfg.device == "cuda" else "float32",
                                  max_model_len=self.gw.max_model_len,
                                  late_attach=not self.preset.prefetch,
                                  streaming_load=self.preset.streaming_load,
                                  gpu_memory_gb=s.claim.gb / self.cluster_cfg.scale.size_scale,
                                  engine=self.gw.engine, vllm_python=self.gw.vllm_python)
                await self.cluster.start_worker(spec)
            inst.mark("workers_spawned")
            clients = await asyncio.gather(*(self.cluster.wait_worker(s.worker_id, 180.0)
                                             for s in inst.stages))
            for s, client in zip(inst.stages, clients):
                s.client = client
            healths = await asyncio.gather(*(s.client.health() for s in inst.stages))
            peers = [{"rank": s.rank, "host": s.client.host, "stage_port": h["stage_port"]}
                     for s, h in zip(inst.stages, healths)]
            await asyncio.gather(*(s.client.init(peers) for s in inst.stages))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the instance failed to start; requests wait on
            log.error("instance %s failed to start: %s", inst.id, e)
            inst.error = str(e)
            await self._stop_instance(inst, InstanceState.FAILED)
            return
        inst.state = InstanceState.READY
        inst.last_used = self.clock()
        inst.mark("ready")
        self._log("ready", instance=inst.id)
        self.wake()
        self._spawn(self._watch_fetches(inst))
        if inst.placement.consolidate:
            self._spawn(self._consolidate(ep, inst))

    async def _watch_fetches(self, inst: Instance) -> None:
        """Release each stage's NIC booking once its worker has all its weights."""
        pending = [s for s in inst.stages if s.fetch is not None]
        while pending and inst.state is InstanceState.READY:
            for s in list(pending):
                try:
                    h = await s.client.health()
                except WorkerError:  # gone: it holds no booking any more
                    h = {"timeline": {"weights_ready": True}}
                if "weights_ready" in h.get("timeline", {}):
                    self._release_fetch(s)
                    pending.remove(s)
            await asyncio.sleep(0.1)
        inst.mark("weights_ready")

    def _release_fetch(self, stage: Stage) -> None:
        """Drop a stage's NIC booking (the ledger may have completed it already)."""
        fetch, stage.fetch = stage.fetch, None
        if fetch is not None and any(f.id == fetch.id for f in self.nics.active(fetch.node)):
            self.nics.finish(fetch)

    # -- consolidation ---------------------------------------------------------------------------
    async def _consolidate(self, ep: Endpoint, inst: Instance) -> None:
        """Merge a pipeline: all-card stages take the whole model, the head migrates the KV of
        its running requests; part-card GPUs are then freed and other all-card stages become
        standalone instances."""
        all_card = [s for s in inst.stages if s.all_card]
        # at low priority: let the requests that started the instance get their first token
        # before the rest of the model competes with them for the head's CPU and copies (at
        # "ready" they may still be queued, not yet dispatched: wait for them too)
        deadline = self.clock() + 120.0
        while "first_token" not in inst.timeline and inst.state is InstanceState.READY and \
                (inst.active or ep.queue) and self.clock() < deadline:
            await asyncio.sleep(0.02)
        # and let each all-card stage finish its own fetch: the rest would share its NIC
        while any(s.fetch is not None for s in all_card) and inst.state is InstanceState.READY:
            await asyncio.sleep(0.05)
        # the rest of the model is fetched with the node's NIC to itself (PAPER.md 5): wait
        # until each all-card node is free of other fetches, then book it exclusively
        rest_gbits = ep.size_gb * 8 * (inst.placement.p - 1) / inst.placement.p
        booked = []
        for s in all_card:
            while inst.state is InstanceState.READY:
                now = self.clock()
                self.nics.advance(now)
                fetch = self.nics.exclusive(s.node, rest_gbits, now)
                if fetch is not None:
                    booked.append(Stage(s.rank, s.node, True, s.claim, s.worker_id, fetch=fetch))
                    break
                await asyncio.sleep(0.1)
        if inst.state is not InstanceState.READY:
            for b in booked:
                self._release_fetch(b)
            return
        inst.mark("consolidation_started")
        inst.consolidating = True  # keep-alive leaves it alone until this ends either way
        try:
            await self._merge(ep, inst, all_card, booked)
        finally:
            inst.consolidating = False

    async def _merge(self, ep: Endpoint, inst: Instance, all_card: list[Stage],
                     booked: list[Stage]) -> None:
        """Consolidation proper: the all-card stages take the whole model (their rest fetches
        booked in ``booked``), then the part-card stages go."""
        try:
            await asyncio.gather(*(s.client.consolidate() for s in all_card))
            for s in all_card:
                while inst.state is InstanceState.READY:
                    h = await s.client.health()
                    if h.get("standalone"):
                        break
                    if h.get("state") == "failed" or h.get("error"):
                        raise RuntimeError(h.get("error") or "stage failed")
                    await asyncio.sleep(0.05)
        except Exception as e:  # noqa: BLE001 - the pipeline keeps serving as it is
            if inst.state is InstanceState.READY:
                log.warning("instance %s: consolidation failed (%s); it stays a pipeline",
                            inst.id, e)
                return
        finally:
            for b in booked:
                self._release_fetch(b)
        if inst.state is not InstanceState.READY:  # stopped (or lost) while it consolidated
            log.info("instance %s: consolidation ended: the instance is %s", inst.id,
                     inst.state.value)
            return
        head, others = inst.stages[0], [s for s in inst.stages[1:]]
        for s in others:
            self._release_fetch(s)
            if not s.all_card:
                await self.cluster.stop_worker(s.worker_id)
                self.gpus.release(s.claim)
        inst.stages = [head]
        inst.capacity = self.gw.batch_capacity
        inst.consolidated = True
        inst.mark("consolidated")
        split = []
        for s in others:
            if s.all_card:  # a standalone worker of its own now
                iid = f"{ep.name}-{next(self._ids)}"
                split.append({"rank": s.rank, "instance": iid})
                now = self.clock()
                solo = Instance(iid, ep.name, inst.placement, [Stage(0, s.node, True, s.claim,
                                                                      s.worker_id, s.layers,
                                                                      s.client)],
                                capacity=self.gw.batch_capacity, state=InstanceState.READY,
                                consolidated=True, created=now, last_used=now, clock=self.clock)
                solo.mark("ready")
                ep.instances.append(solo)
                self.instances[iid] = solo
        self._log("consolidated", instance=inst.id,
                  released=[s.rank for s in others if not s.all_card], split=split)
        log.info("instance %s consolidated into %s", inst.id, head.node)
        self.wake()

    # -- serving -----------------------------------------------------------------------------------
    def _dispatch(self, inst: Instance, req: Request) -> None:
        inst.active += 1
        req.instance = inst.id
        self._serving[req.id] = req
        req.task = self._spawn(self._serve(inst, req))

    async def _serve(self, inst: Instance, req: Request) -> None:
        """Relay one request's stream from its instance. If the instance is lost (a stage
        died, its server went away, or its worker left in order and handed the stream over),
        the instance is retired and the request goes back to the queue with its tokens so far,
        to continue on another instance."""
        try:
            lost = await self._relay(inst, req)
            if lost is not None:
                detail, handover = lost
                if inst.state is InstanceState.READY:
                    # it takes no more requests; the requests it still has are lost alike
                    inst.error = detail
                    if handover:
                        log.info("instance %s is leaving (its worker handed its streams over)",
                                 inst.id)
                    else:
                        log.error("instance %s failed while serving: %s", inst.id, detail)
                    self._retire(inst, InstanceState.STOPPED if handover else InstanceState.FAILED)
                self._place_again(req, f"instance {inst.id}: {detail}")
        finally:
            self._serving.pop(req.id, None)
            inst.active -= 1
            inst.last_used = self.clock()
            self._log("request_end", instance=inst.id, model=inst.model, request=req.id,
                      tokens=req.tokens)
            self.wake()

    async def _relay(self, inst: Instance, req: Request) -> tuple[str, bool] | None:
        """Pass the instance's token items on to the request. None once the request ended
        (finished, or refused as invalid); else why the instance lost it, and whether in order
        (a handover)."""
        body = {"prompt_ids": req.prompt_ids, **req.params}
        if req.output_ids:  # a resumed stream: the worker continues after these
            body["output_ids"] = list(req.output_ids)
        try:
            async for item in inst.head.client.generate(body):
                if "error" in item:
                    if item.get("status") == 400:  # the request's fault; the worker is fine
                        req.events.put_nowait({"error": item["error"], "status": 400})
                        return None
                    return str(item["error"]), bool(item.get("handover"))
                if req.first_token is None:
                    req.first_token = self.clock()
                    inst.mark("first_token")
                if item.get("token_id") is not None:
                    req.output_ids.append(int(item["token_id"]))
                req.events.put_nowait(item)
                if item.get("finish_reason"):
                    return None
        except WorkerError as e:
            if e.status == 400:
                req.events.put_nowait({"error": str(e), "status": 400})
                return None
            return str(e), False
        return "the worker closed the stream early", False

    def _place_again(self, req: Request, detail: str) -> None:
        """A request's instance was lost: queue it again at the front (it continues from its
        tokens so far) while its retry budget lasts, else end it with a clear error event.
        Its deadline is the queue timeout, counted from now."""
        ep = self.endpoints.get(req.model)
        if (req.retries < self.gw.failover_retries and ep is not None and not self._closing
                and not self._draining and not req.cancelled):
            req.retries += 1
            req.instance = None
            req.queued_at = self.clock()
            if req.output_ids:
                ep.resumed += 1
            ep.queue.insert(0, req)
            log.warning("request %s goes back to the queue after %d token(s) (%s)", req.id,
                        req.tokens, detail)
            return
        log.error("request %s failed after %d retries: %s", req.id, req.retries, detail)
        req.events.put_nowait({"error": LOST, "status": 503})

    # -- stopping ----------------------------------------------------------------------------------
    def _retire(self, inst: Instance, final: InstanceState) -> None:
        """Stop a ready instance in the background; from this moment it takes no request."""
        if inst.state is InstanceState.READY:
            inst.state = InstanceState.STOPPING
            self._spawn(self._teardown(inst, final))

    async def _stop_instance(self, inst: Instance, final: InstanceState) -> None:
        if inst.state in (InstanceState.STOPPING, InstanceState.STOPPED):
            return
        inst.state = InstanceState.STOPPING
        await self._teardown(inst, final)

    async def _teardown(self, inst: Instance, final: InstanceState) -> None:
        """Stop the workers (each hands its open streams over first) and free the claims."""
        for s in inst.stages:
            if s.client is not None:
                try:
                    await asyncio.wait_for(s.client.stop(), 5)
                except Exception:  # noqa: BLE001 - it may be dead already; stop_worker kills
                    pass
            await self.cluster.stop_worker(s.worker_id)
            self._release_fetch(s)
            self.gpus.release(s.claim)
        inst.state = final
        ep = self.endpoints.get(inst.model)
        if ep is not None and inst in ep.instances:
            ep.instances.remove(inst)
        self.instances.pop(inst.id, None)
        self._log("deleted", instance=inst.id, state=final.value, error=inst.error)
        log.info("instance %s %s", inst.id, final.value)
        if self.preset.cache:
            await self._refresh_cache()
        self.wake()

    async def _refresh_cache(self) -> None:
        for s in self.cluster_cfg.servers:
            try:
                self.cached[s.name] = await self.cluster.cached_models(s.name)
            except WorkerError:
                pass

    def describe(self) -> dict:
        pool = getattr(self.cluster, "pool", None)  # the warm runtimes, where the backend has them
        idle, imported = (pool(), pool(imported=True)) if pool else ({}, {})
        return {"exec_type": self.gw.exec_type,
                "agents": self.cluster.agent_urls(),
                "warm_runtimes": {node: {"idle": len(pids), "imported": len(imported[node])}
                                  for node, pids in idle.items()},
                "models": {n: {"queued": len(ep.queue), "cold_starts": ep.cold_starts,
                               "size_gb": round(ep.size_gb, 3),
                               "instances": [i.id for i in ep.instances]}
                           for n, ep in self.endpoints.items()}}
