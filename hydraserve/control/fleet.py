"""Instance lifecycle: scale up (place and claim), start (prefetch, start the workers through
the backend, join them into a ring), watch each stage's fetch, and stop.

An instance start claims GPU memory and NIC shares, orders each stage's prefetch from its
node's agent *before* the workers exist, then starts the workers and joins them with /init.
A pipeline with part-card stages consolidates as soon as it serves (see `consolidation`)."""
from __future__ import annotations

import asyncio
import logging

from hydraserve.cluster.base import WorkerError
from hydraserve.control.consolidation import Consolidation
from hydraserve.control.instance import Instance, InstanceState, Stage
from hydraserve.control.placer import Placer
from hydraserve.control.presets import emulated_gpu_costs
from hydraserve.control.snapshot import MAX_GROUP
from hydraserve.control.state import ControlState, Endpoint
from hydraserve.protocol import Peer, WorkerSpec
from hydraserve.testbeds import gpu_kind_of

WORKER_START_S = 180.0  # a worker's control API must serve within this
FETCH_WAIT_S = 3600.0  # the longest wait for a stage's weights (a long-poll, re-armed)
FETCH_POLL_S = 0.05  # the poll of an agent's fetch record (presets that start after the fetch)

log = logging.getLogger("hydraserve.control")


class Fleet:
    def __init__(self, state: ControlState, placer: Placer):
        self.s = state
        self.placer = placer
        self.consolidation = Consolidation(state)

    # -- up --------------------------------------------------------------------------------------
    def scale_up(self, ep: Endpoint, now: float, wanted: int) -> None:
        """Place and start up to ``wanted`` instances, at most `MAX_GROUP` stages in all."""
        budget = MAX_GROUP
        while wanted > 0 and budget > 0:
            if not self.placer.may_place(ep, now):
                return
            req = self.placer.request(ep, now, wanted)
            placement = self.placer.place(req)
            if placement is None or placement.p > budget:
                return
            inst = self.placer.claim(ep, placement, req, now)
            if inst is None:
                return
            wanted -= 1
            budget -= placement.p
            ep.cold_starts += 1
            self.s.open_cold_start(ep, inst)
            self.s.spawn(self._start(ep, inst))

    async def _layout(self, ep: Endpoint, p: int) -> list[tuple[int, int]]:
        if p not in ep.layouts:
            ep.layouts[p] = await self.s.cluster.layout(ep.name, p)
        return ep.layouts[p]

    def spec(self, ep: Endpoint, inst: Instance, s: Stage) -> WorkerSpec:
        cfg, gw, preset = self.s.cluster_cfg, self.s.gw, self.s.preset
        profile_s = load_gbs = None
        if cfg.scale.emulate_gpu_costs and gw.engine == "hydraserve":  # the genuine vLLM has both
            profile_s, load_gbs = emulated_gpu_costs(preset, gpu_kind_of(s.node))
        return WorkerSpec(worker_id=s.worker_id, model=ep.name, node=s.node, rank=s.rank,
                          p=inst.placement.p, layers=s.layers, all_card=s.all_card,
                          instance=inst.id, gpu=s.claim.gpu, claim_gb=s.claim.gb,
                          num_kv_blocks=ep.num_kv_blocks, device=cfg.device,
                          # on GPUs half precision, as the memory claims assume
                          dtype="float16" if cfg.device == "cuda" else "float32",
                          max_model_len=gw.max_model_len, late_attach=not preset.prefetch,
                          streaming_load=preset.streaming_load,
                          gpu_memory_gb=s.claim.gb / cfg.scale.size_scale,
                          engine=gw.engine, vllm_python=gw.vllm_python, load_gbs=load_gbs,
                          size_scale=cfg.scale.size_scale, profile_s=profile_s)

    async def _start(self, ep: Endpoint, inst: Instance) -> None:
        st, cluster, p = self.s, self.s.cluster, inst.placement.p
        rec = st.coldstarts.get(inst.id)
        try:
            layers = await self._layout(ep, p)
            for s in inst.stages:
                s.layers = layers[s.rank]
            if st.preset.prefetch:
                inst.mark("prefetch_started")
                kind = "full" if p == 1 else "stage"
                await asyncio.gather(*(cluster.prefetch(s.node, ep.name, kind, p, s.rank)
                                       for s in inst.stages))
                if st.preset.start_after_fetch:  # ServerlessLLM: checkpoint first, then runtime
                    await asyncio.gather(*(self._fetched(ep.name, kind, p, s)
                                           for s in inst.stages))
                    inst.mark("fetched")  # its cold start's fetch phase comes before spawn
            for s in inst.stages:
                if rec is not None:
                    rec.stage(s.rank).ordered = st.clock()
                await cluster.start_worker(self.spec(ep, inst, s))
            inst.mark("workers_spawned")
            clients = await asyncio.gather(*(self._serving(rec, s) for s in inst.stages))
            for s, client in zip(inst.stages, clients):
                s.client = client
            healths = await asyncio.gather(*(s.client.health() for s in inst.stages))
            peers = [Peer(s.rank, s.client.host, h.stage_port)
                     for s, h in zip(inst.stages, healths)]
            await asyncio.gather(*(s.client.init(peers) for s in inst.stages))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the instance failed to start; requests wait on
            log.error("instance %s failed to start: %s", inst.id, e)
            inst.error = str(e)
            if rec is not None:
                rec.state, rec.error = "failed", str(e)
            st.emit("failure", kind="start_failed", model=ep.name, instance=inst.id)
            await self.stop(inst, InstanceState.FAILED)
            return
        inst.state = InstanceState.READY
        inst.last_used = st.clock()
        st.touch(ep)
        inst.mark("ready")
        st.log("ready", instance=inst.id)
        st.wake()
        st.spawn(self._watch_fetches(inst))
        if inst.placement.consolidate:
            st.spawn(self.consolidation.run(ep, inst))

    async def _fetched(self, model: str, kind: str, p: int, stage: Stage) -> None:
        """Wait until ``stage``'s node holds its whole image in host memory (the agent's fetch
        record says done; none: nothing is being fetched, e.g. a cached checkpoint)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FETCH_WAIT_S
        while True:
            try:
                stats = await self.s.cluster.fetch_stats(stage.node, model, kind, p, stage.rank)
            except (AttributeError, NotImplementedError):  # a backend without fetch records
                return
            if stats is None or stats["done"]:
                return
            if loop.time() > deadline:
                raise WorkerError(f"the fetch of {model} on {stage.node} did not complete", 504)
            await asyncio.sleep(FETCH_POLL_S)

    async def _serving(self, rec, stage: Stage):
        """Wait until ``stage``'s worker serves its control API; its client."""
        client = await self.s.cluster.wait_worker(stage.worker_id, WORKER_START_S)
        if rec is not None:
            rec.stage(stage.rank).serving = self.s.clock()
        return client

    async def _watch_fetches(self, inst: Instance) -> None:
        """Release each stage's NIC booking as soon as its worker has all its weights (a
        long-poll of the worker's timeline, not a poll)."""
        await asyncio.gather(*(self._watch_fetch(inst, s) for s in inst.stages
                               if s.fetch is not None))
        inst.mark("weights_ready")

    async def _watch_fetch(self, inst: Instance, stage: Stage) -> None:
        h = None
        while inst.state is InstanceState.READY:
            try:
                h = await stage.client.wait_for("weights_ready", FETCH_WAIT_S)
            except WorkerError:  # gone: it holds no booking any more
                break
            if h.settled("weights_ready"):  # else the long-poll timed out: wait again
                break
        self.s.release_fetch(stage)
        rec = self.s.coldstarts.get(inst.id)
        if rec is not None and h is not None and h.has("weights_ready"):
            rec.stage(stage.rank).read_timeline(h.timeline)
            await self._fetch_stats(inst, rec, stage)

    async def _fetch_stats(self, inst: Instance, rec, stage: Stage) -> None:
        """What the stage's agent fetched, into its trace and as a "fetch" event (once)."""
        trace = rec.stage(stage.rank)
        if trace is None or trace.fetch_bytes is not None or rec.from_cache:
            return
        p = inst.placement.p
        try:
            stats = await self.s.cluster.fetch_stats(stage.node, inst.model,
                                                     "full" if p == 1 else "stage", p,
                                                     stage.rank)
        except Exception as e:  # noqa: BLE001 - an operator's figure: never fail a start on it
            log.debug("fetch stats of %s rank %d: %s", inst.id, stage.rank, e)
            return
        if stats and stats["done"] and trace.fetch_bytes is None:
            trace.fetch_bytes, trace.fetch_s = int(stats["received"]), float(stats["seconds"])
            self.s.emit("fetch", server=stage.node, model=inst.model, instance=inst.id,
                        bytes=trace.fetch_bytes, seconds=round(trace.fetch_s, 6))

    def first_token(self, inst: Instance) -> None:
        """An instance gave its first token: its cold start is complete (the router's call)."""
        rec = self.s.coldstarts.get(inst.id)
        if rec is not None and rec.state == "starting":
            rec.state = "serving"
            self.s.spawn(self._complete(inst, rec))

    async def _complete(self, inst: Instance, rec) -> None:
        """The stages' timelines as they are now (the engine's start included) and their
        fetches, then the "cold_start" event with the record."""
        for stage in list(inst.stages):
            if stage.client is None:
                continue
            try:
                h = await stage.client.health()
            except Exception:  # noqa: BLE001 - a stage may be gone already
                continue
            rec.stage(stage.rank).read_timeline(h.timeline)
            await self._fetch_stats(inst, rec, stage)
        self.s.emit("cold_start", **rec.to_json())

    # -- down ------------------------------------------------------------------------------------
    def retire(self, inst: Instance, final: InstanceState) -> None:
        """Stop a ready instance in the background; from this moment it takes no request."""
        if inst.state is InstanceState.READY:
            inst.state = InstanceState.STOPPING
            self.s.touch_model(inst.model)
            self.s.spawn(self._teardown(inst, final))

    async def stop(self, inst: Instance, final: InstanceState = InstanceState.STOPPED) -> None:
        if inst.state in (InstanceState.STOPPING, InstanceState.STOPPED):
            return
        inst.state = InstanceState.STOPPING
        self.s.touch_model(inst.model)
        await self._teardown(inst, final)

    async def _teardown(self, inst: Instance, final: InstanceState) -> None:
        """Stop the workers (each hands its open streams over first) and free the claims."""
        st = self.s
        for s in inst.stages:
            if s.client is not None:
                try:
                    await asyncio.wait_for(s.client.stop(), 5)
                except Exception:  # noqa: BLE001 - it may be dead already; stop_worker kills
                    pass
            await st.cluster.stop_worker(s.worker_id)
            st.release_fetch(s)
            st.gpus.release(s.claim)
        inst.state = final
        st.remove(inst)  # touches its endpoint
        st.log("deleted", instance=inst.id, state=final.value, error=inst.error)
        log.info("instance %s %s", inst.id, final.value)
        if st.preset.cache:
            await self.refresh_cache()
        st.wake()

    async def refresh_cache(self) -> None:
        """What each node's agent holds whole in host memory (it changes behind our back)."""
        for n in self.s.cluster_cfg.servers:
            try:
                self.s.cached[n.name] = await self.s.cluster.cached_models(n.name)
            except WorkerError:
                pass
