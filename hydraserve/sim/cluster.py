"""The simulated cluster: a `ClusterBackend` whose workers are timed by the cost model and whose
fetches share NICs in the fluid network model, on the simulator's virtual-time loop.

Each server is a ServerConfig of the cluster config (GPU memory is the control plane's ledger,
as in the local backend); its GPU kind (for compute and PCIe) comes from ``gpu_of`` or from its
name's prefix (a10-*, v100-*; anything else is "cpu"). Storage agents are modelled by regions:
a prefetch starts a flow now, a worker attaches to it when it starts (or starts its own fetch
after its imports when it was not prefetched: the Serverless vLLM path). With a host cache
(cache_gb > 0) a node keeps whole models it fetched, LRU, and serves them with no fetch.

Not modelled: GPU compute shared by instances on one GPU, the CPU of a server, host memory,
the store's disk; KV-cache limits (the control plane's batch capacity bounds a batch).
"""
from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping

from hydraserve.cluster.base import WorkerError, WorkerSpec
from hydraserve.protocol import (ErrorEvent, GenerateRequest, Peer, Phase, TokenEvent,
                                 WorkerHealth)
from hydraserve.config import ClusterConfig, ServerConfig
from hydraserve.sim.costmodel import (GPUS, CostModel, GpuSpec, ModelShape, decode_s,
                                      gpu_kind_of, prefill_s)
from hydraserve.sim.network import Flow, FluidNetwork
from hydraserve.store.layout import split_layers

CHUNK_GB = 0.032  # the fetch chunk (PAPER.md 3: 32 MB): what is left to copy after the fetch
TOKENS_PER_WAKEUP = 32  # decode tokens delivered per timer (times stay exact, see generate)


def gpu_kind(server: ServerConfig) -> str:
    return gpu_kind_of(server.name)


class SimCluster:
    """`ClusterBackend` of the simulator (see the module doc)."""

    def __init__(self, cfg: ClusterConfig, shapes: Mapping[str, ModelShape],
                 cost: CostModel | None = None, gpu_of: Mapping[str, str] | None = None):
        self.cfg = cfg
        self.shapes = dict(shapes)
        self.cost = cost or CostModel.gpu_default()
        kinds = {s.name: (gpu_of or {}).get(s.name, gpu_kind(s)) for s in cfg.servers}
        self.gpu = {name: GPUS[kind] for name, kind in kinds.items()}
        self.host_cost = {name: self.cost.on(kind) for name, kind in kinds.items()}
        self.net = FluidNetwork({s.name: s.nic_gbps for s in cfg.servers}, cfg.egress_gbps)
        # one machine's cores shared by every server's imports (the local testbed), or none
        self.cpu = FluidNetwork({"cpu": float(self.cost.shared_cores)}, flow_cap=1.0) \
            if self.cost.shared_cores else None
        self.workers: dict[str, SimWorker] = {}
        self.by_port: dict[int, SimWorker] = {}
        self.regions: dict[tuple, Flow] = {}
        self.fetched: dict[tuple, Flow] = {}  # the latest flow of each image (fetch_stats)
        self.cache: dict[str, OrderedDict[str, float]] = {s.name: OrderedDict()
                                                          for s in cfg.servers}
        self.models: set[str] = set()
        self._ports = itertools.count(1)

    # -- the sync part of the protocol --------------------------------------------------------
    def start(self) -> None:
        pass

    def close(self) -> None:
        for w in list(self.workers.values()):
            w.kill()

    def detach(self) -> None:
        pass  # the simulated workers stay for the control plane that takes over

    def renew_lease(self) -> None:
        pass  # simulated workers hold no lease

    async def list_workers(self) -> dict[str, "SimWorker"]:
        return {wid: w for wid, w in self.workers.items() if w.state != "stopped"}

    def nodes(self) -> tuple[ServerConfig, ...]:
        return self.cfg.servers

    def agent_urls(self) -> dict[str, str]:
        return {}

    def gpu_budgets(self) -> dict[str, list[float]]:
        return {s.name: list(s.gpus) for s in self.cfg.servers}  # no warm runtimes here

    def warm_pool(self) -> dict[str, dict[str, int]]:
        return {}

    def model_size_gb(self, name: str) -> float:
        return self._shape(name).size_gb

    def register_model(self, name: str, path: str) -> None:
        if name not in self.shapes:
            raise ValueError(f"the simulator has no shape for model {name!r}")
        self.models.add(name)

    def unregister_model(self, name: str) -> None:
        self.models.discard(name)

    def worker_alive(self, worker_id: str) -> bool:
        w = self.workers.get(worker_id)
        return w is not None and w.state != "stopped"

    # -- sizes ----------------------------------------------------------------------------------
    def _shape(self, model: str) -> ModelShape:
        if model not in self.models:
            raise WorkerError(f"no model {model!r} in the store", 404)
        return self.shapes[model]

    def stage_gb(self, model: str, p: int, rank: int) -> float:
        """Weight GB of stage ``rank`` of ``p``: its share of the layers (embedding and head
        counted as a layer each on the end stages)."""
        shape = self._shape(model)
        if p == 1:
            return shape.size_gb
        ranges = split_layers([1] * shape.num_layers, 1, 1, p)
        units = len(ranges[rank]) + (rank == 0) + (rank == p - 1)
        return shape.size_gb * units / (shape.num_layers + 2)

    async def layout(self, model: str, p: int) -> list[tuple[int, int]]:
        shape = self._shape(model)
        return [(r.start, r.stop) for r in split_layers([1] * shape.num_layers, 1, 1, p)]

    # -- storage agents -------------------------------------------------------------------------
    def _cached(self, node: str, model: str) -> bool:
        if model in self.cache[node]:
            self.cache[node].move_to_end(model)
            return True
        return False

    def _keep(self, node: str, model: str) -> None:
        cap = self.cfg.server(node).cache_gb
        size = self.shapes[model].size_gb
        if cap <= 0 or size > cap:
            return
        held = self.cache[node]
        held[model] = size
        held.move_to_end(model)
        busy = {w.spec.model for w in self.workers.values()
                if w.spec.node == node and w.state != "stopped"}
        while sum(held.values()) > cap:
            victim = next((m for m in held if m not in busy and m != model), None)
            if victim is None:
                break
            del held[victim]

    def fetch(self, node: str, model: str, kind: str, p: int, rank: int) -> Flow:
        """The region's flow: the prefetched one, or a new one (a cached model: no bytes)."""
        key = (node, model, kind, p, rank)
        if key in self.regions:
            return self.regions.pop(key)
        if kind == "full" and self._cached(node, model):
            return self.net.start(node, 0.0)
        gb = self.shapes[model].size_gb if kind == "full" else self.stage_gb(model, p, rank)
        flow = self.net.start(node, gb * 8)
        self.fetched[key] = flow
        if kind == "full":
            flow.done.add_done_callback(
                lambda f: None if f.cancelled() else self._keep(node, model))
        return flow

    async def prefetch(self, node: str, model: str, kind: str, p: int, rank: int) -> None:
        self._shape(model)
        key = (node, model, kind, p, rank)
        if key not in self.regions:
            self.regions[key] = self.fetch(node, model, kind, p, rank)

    async def cached_models(self, node: str) -> set[str]:
        return set(self.cache[node])

    async def fetch_stats(self, node: str, model: str, kind: str, p: int,
                          rank: int) -> dict | None:
        flow = self.fetched.get((node, model, kind, p, rank))
        if flow is None:
            return None
        done = flow.done.done() and not flow.done.cancelled()
        end = flow.done.result() if done else asyncio.get_running_loop().time()
        nbytes = flow.total / 8 * 1e9  # the paper's bytes
        return {"length": int(nbytes), "received": int(nbytes * (1.0 if done else
                                                                  flow.fraction())),
                "seconds": end - flow.started, "done": done}

    async def warm_cache(self, model: str) -> None:
        for s in self.cfg.servers:
            self._keep(s.name, model)

    # -- workers --------------------------------------------------------------------------------
    async def start_worker(self, spec: WorkerSpec) -> None:
        w = SimWorker(self, spec, next(self._ports))
        self.workers[spec.worker_id] = w
        self.by_port[w.stage_port] = w

    async def wait_worker(self, worker_id: str, timeout: float = 120.0) -> "SimWorker":
        w = self.workers[worker_id]
        await asyncio.wait_for(asyncio.shield(w.api_up), timeout)
        return w

    async def stop_worker(self, worker_id: str) -> None:
        w = self.workers.pop(worker_id, None)
        if w is not None:
            w.kill()
            self.by_port.pop(w.stage_port, None)

    async def aclose(self) -> None:
        pass


class SimWorker:
    """A simulated ``hydraserve worker`` (`WorkerClient`): boots through the cost model's
    phases, serves tokens at the roofline's pace, consolidates by fetching the rest."""

    host = "sim"
    url = None

    def __init__(self, cluster: SimCluster, spec: WorkerSpec, stage_port: int):
        loop = asyncio.get_running_loop()
        self.cluster, self.spec, self.stage_port = cluster, spec, stage_port
        self.cost = cluster.host_cost[spec.node]
        self.shape = cluster.shapes[spec.model]
        self.gpu: GpuSpec = cluster.gpu[spec.node]
        self.t0 = loop.time()
        self.timeline: dict[str, float] = {"spawned": 0.0}
        self.api_up: asyncio.Future = loop.create_future()
        self.ready: asyncio.Future = loop.create_future()
        self.state, self.error = "starting", None
        self.changed = asyncio.Event()  # set at each stamp and when it stops (see wait_for)
        self.leaving = False  # stopped in order: open streams are handed over
        self.standalone = spec.p == 1
        self.peers: list[int] = []
        self.active = 0
        self.gb = cluster.stage_gb(spec.model, spec.p, spec.rank)
        self.flows: list[Flow] = []
        self.tasks = [asyncio.create_task(self._boot())]

    def _mark(self, event: str) -> None:
        self.timeline.setdefault(event, round(asyncio.get_running_loop().time() - self.t0, 6))
        self.changed.set()

    async def _boot(self) -> None:
        """The worker's start. Three paths, by its spec:
        - HydraServe (PAPER.md 2.3): the fetch was ordered before the worker exists; the imports
          overlap it and tensors are copied while bytes arrive, so only the last chunk is left
          to copy when the fetch ends (streaming_load).
        - Serverless vLLM (late_attach, no streaming): the worker starts its own download once
          up, then vLLM's stock loader reads the file to host memory and copies each tensor to
          the GPU, at PCIe / `vllm_loader_slowdown`; a stock engine start (profile_s) follows.
        - ServerlessLLM (no late attach, no streaming): the control plane starts it only once
          the checkpoint is in host memory (`Preset.start_after_fetch`), so the fetch it
          attaches to is complete (or none: cached); its loader copies the checkpoint host ->
          GPU at PCIe speed (ServerlessLLM's paper: the loader runs at the bandwidth of the
          tier); its runtime is a stock vLLM engine (profile_s).
        A spec that asks its worker to emulate a GPU's loader rate or profiling pass (a CPU
        stand-in on a scaled testbed: `WorkerSpec.load_gbs`, ``profile_s``) is timed by those,
        as the real worker paces itself; the control plane takes them from `gpu_default`, so
        on a GPU host they equal the cost model's own values."""
        s, c = self.spec, self.cost
        await asyncio.sleep(c.process_s)
        self._mark("attached")
        self.api_up.set_result(True)
        kind = "full" if s.p == 1 else "stage"
        if s.late_attach:  # the baseline: fetch once the worker is up
            await self._imports()
            self._mark("imports_done")
            flow = self.cluster.fetch(s.node, s.model, kind, s.p, s.rank)
            self.flows.append(flow)
            await flow.done
        else:
            flow = self.cluster.fetch(s.node, s.model, kind, s.p, s.rank)
            self.flows.append(flow)
            imports = asyncio.create_task(self._imports())
            self.tasks.append(imports)
            await imports
            self._mark("imports_done")
            await flow.done
        if s.load_gbs is not None:  # the rate the spec asks a stand-in to emulate
            copy = self.gb / s.load_gbs
        elif s.streaming_load and not s.late_attach:  # copied while bytes arrived: the tail
            copy = min(self.gb, CHUNK_GB) / self.gpu.pcie_gbs
        elif s.late_attach:  # vLLM's stock loader, after the download
            copy = self.gb / (self.gpu.pcie_gbs / c.vllm_loader_slowdown)
        else:  # ServerlessLLM's loader from host memory
            copy = self.gb / self.gpu.pcie_gbs
        await asyncio.sleep(copy)
        self._mark("weights_ready")
        if s.profile_s is not None:  # the pass the spec asks a stand-in to emulate
            profile = s.profile_s
        else:  # the baselines' vLLM engine: profiling on
            profile = c.profile_s if not s.streaming_load else 0.0
        await asyncio.sleep(c.engine_init_s + profile)
        self._mark("engine_ready")
        self.state = "ready"
        self.ready.set_result(True)

    async def _imports(self) -> None:
        if self.cluster.cpu is None:
            await asyncio.sleep(self.cost.import_s)
            return
        job = self.cluster.cpu.start("cpu", self.cost.import_s)  # core-seconds
        try:
            await job.done
        finally:
            self.cluster.cpu.cancel(job)

    def kill(self) -> None:
        self.state = "stopped"
        self.changed.set()
        for t in self.tasks:
            t.cancel()
        for f in self.flows:
            self.cluster.net.cancel(f)

    # -- WorkerClient -------------------------------------------------------------------------
    async def health(self) -> WorkerHealth:
        if self.state == "stopped":
            raise WorkerError(f"worker {self.spec.worker_id} is gone", 503)
        phase = Phase.READY if self.state == "ready" else Phase.LOADING
        return WorkerHealth(phase, self.spec.worker_id, self.error, self.stage_port,
                            self.standalone, dict(self.timeline), spec=self.spec,
                            running=self.active)

    async def wait_for(self, event: str, timeout: float) -> WorkerHealth:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.changed.clear()
            h = await self.health()
            if h.settled(event) or loop.time() >= deadline:
                return h
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                pass

    async def init(self, peers: list[Peer]) -> None:
        self.peers = [p.stage_port for p in sorted(peers, key=lambda p: p.rank)]
        self._mark("connected")  # as a real stage once its ring is joined (adoption reads it)

    def _ring(self) -> list["SimWorker"]:
        if self.state == "stopped":
            raise WorkerError(f"worker {self.spec.worker_id} is gone", 503)
        if self.standalone:
            return [self]
        if not self.peers:  # its control plane died between its spawn and /init
            raise WorkerError("the pipeline's ring was never joined", 503)
        ring = [self.cluster.by_port.get(port) for port in self.peers]
        if any(w is None or w.state == "stopped" for w in ring):
            raise WorkerError("a stage of the pipeline is gone", 503)
        return ring

    def _step_s(self, ring: list["SimWorker"], batch: int) -> float:
        """One token through every stage: each stage's share of a full step on its GPU."""
        size = self.shape.size_gb
        compute = sum(w.gb / size * decode_s(self.shape, batch, w.gpu, self.cost) for w in ring)
        return compute + self.cost.hop_ms / 1000 * (len(ring) - 1)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent | ErrorEvent]:
        done = len(req.output_ids)  # a resumed stream continues after these
        n_out = int(req.params.get("max_tokens") or 16) - done
        prompt = len(req.prompt_ids) + done
        if n_out < 1 or prompt < 1:
            raise WorkerError("max_tokens and the prompt must be positive", 400)
        for w in self._ring():
            await asyncio.shield(w.ready)
        ring = self._ring()
        self.active += 1
        try:
            size = self.shape.size_gb
            first = sum(w.gb / size * prefill_s(self.shape, prompt, w.gpu, self.cost)
                        for w in ring) + self.cost.hop_ms / 1000 * (len(ring) - 1)
            await asyncio.sleep(first + self.cost.request_s)
            yield TokenEvent(0, "length" if n_out == 1 else None)
            left = n_out - 1
            while left > 0:
                if self.leaving:  # stopped in order: the control plane continues elsewhere
                    yield ErrorEvent("the worker is stopping", handover=True)
                    return
                ring = self._ring()  # consolidation may shorten it mid-stream
                k = min(left, TOKENS_PER_WAKEUP)
                await asyncio.sleep(k * self._step_s(ring, self.active))
                left -= k
                for i in range(k):
                    yield TokenEvent(0, "length" if left == 0 and i == k - 1 else None)
        finally:
            self.active -= 1

    async def consolidate(self) -> None:
        if not self.spec.all_card:
            raise WorkerError("only an all-card stage can consolidate", 400)
        if "consolidation_started" in self.timeline:
            return  # under way (a control plane that took over asks again): as the real worker
        # as the real worker's timeline has it; stamped without waking a waiter, as before
        self.timeline.setdefault("consolidation_started",
                                 round(asyncio.get_running_loop().time() - self.t0, 6))
        self.tasks.append(asyncio.create_task(self._consolidate()))

    async def _consolidate(self) -> None:
        rest = self.shape.size_gb - self.gb
        flow = self.cluster.net.start(self.spec.node, rest * 8)
        self.flows.append(flow)
        await flow.done
        await asyncio.sleep(rest / self.gpu.pcie_gbs + self.cost.migrate_s)
        self.gb = self.shape.size_gb
        self.standalone = True
        self._mark("consolidated")

    async def stop(self) -> None:
        self.leaving = True
        self.kill()
