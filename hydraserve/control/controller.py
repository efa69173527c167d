"""The control plane: model registration, the reconcile loop, and the read API the gateway, the
metrics and the simulator use (asyncio, torch-free).

Every tick (0.1 s, or at once when something changes) the loop reconciles each endpoint that
has work: expire and dispatch its queue (`router`), ask the pure autoscaling rule what to start
and stop (`autoscale`), then start instances in groups of at most 4 stages' worth (`fleet`,
which places them with `placer` and consolidates pipelines with `consolidation`) and stop the
idle ones. What the parts share is in `state`.

An endpoint's reconcile is a no-op unless something it reads changed since its last one
(`ControlState.touch`), it still wants instances (placement depends on the time and on the
cluster), or a queued request's timeout or an idle instance's keep-alive may have run out
(`Endpoint.due`); a tick reconciles only those, in registration order, and so does exactly
what reconciling every endpoint would.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from hydraserve.cluster.base import ClusterBackend
from hydraserve.config import ClusterConfig, GatewayConfig, ModelConfigEntry
from hydraserve.control import autoscale
from hydraserve.control.adoption import adopt
from hydraserve.control.fleet import Fleet
from hydraserve.control.instance import Instance, InstanceState, Request
from hydraserve.control.placer import Placer
from hydraserve.control.presets import Preset, resolve
from hydraserve.control.router import SHUTTING_DOWN, Router
from hydraserve.control.view import OperatorView
from hydraserve.control.state import ControlState, Draining, Endpoint, QueueFull  # noqa: F401
from hydraserve.engine.config import EngineConfig, ModelConfig, num_kv_blocks  # torch-free

TICK_S = 0.1
CACHE_CHECK_S = 1.0  # how often what the agents hold whole is read again (it changes by LRU)

log = logging.getLogger("hydraserve.control")


class Controller:
    def __init__(self, cluster: ClusterBackend, cluster_cfg: ClusterConfig, gw: GatewayConfig,
                 preset: Preset, clock: Callable[[], float] = time.monotonic,
                 lifecycle_clock: Callable[[], float] = time.time):
        """``clock`` (monotonic seconds) times everything the control plane decides on; the
        simulator passes its virtual-time loop's clock. ``lifecycle_clock`` stamps the
        lifecycle log (the wall clock, the replay's time axis, by default)."""
        self.state = ControlState(cluster, cluster_cfg, gw, preset, clock, lifecycle_clock)
        self.preset, self.gw, self.cluster = preset, gw, cluster
        self.placer = Placer(self.state)
        self.fleet = Fleet(self.state, self.placer)
        self.router = Router(self.state, self.fleet.retire, self.fleet.first_token)
        self.submit, self.cancel, self.drain = \
            self.router.submit, self.router.cancel, self.router.drain
        self.scaling = autoscale.AutoscaleConfig(gw.batch_capacity, gw.keep_alive_s)
        self.view = OperatorView(self.state)  # resources, cold starts, progress, events

    @classmethod
    def build(cls, cluster: ClusterBackend, cluster_cfg: ClusterConfig, gw: GatewayConfig,
              **clocks) -> Controller:
        """A controller for ``gw``'s execution type (and static p, if set): the one place the
        preset is chosen."""
        return cls(cluster, cluster_cfg, gw, resolve(gw.exec_type, gw.static_p), **clocks)

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Adopt what runs in the cluster (`adoption`; register the models first), then run the
        reconcile loop."""
        found = await adopt(self.state)
        for iid in found.instances:
            inst = self.state.instances[iid]
            if inst.placement.consolidate:
                self.state.spawn(self.fleet.consolidation.run(self.state.endpoints[inst.model],
                                                              inst))
        if self.preset.cache:
            await self.fleet.refresh_cache()  # the agents' host caches, as they are
        self.state.spawn(self._run())  # cancelled with the other tasks at close

    async def close(self, hand_over: bool = False) -> None:
        """Stop: every instance is stopped, or with ``hand_over`` left running for the control
        plane that takes over (a standby), which adopts them."""
        s = self.state
        s.closing = True
        for t in list(s.tasks):
            t.cancel()
        for inst in list(s.instances.values()) if not hand_over else ():
            await self.fleet.stop(inst, InstanceState.STOPPED)
        for ep in s.endpoints.values():
            for req in ep.queue:
                req.events.put_nowait(dict(SHUTTING_DOWN))
        await s.cluster.aclose()
        if s.lifecycle:
            s.lifecycle.close()

    def begin_drain(self, grace_s: float, hand_over: bool = False) -> None:
        """Shut down in the background (see `Router.drain`); call on the control plane's loop.
        ``hand_over``: another control plane leads now: from here on this one only serves what
        it holds, and never starts or stops an instance."""
        self.state.handing_over = self.state.handing_over or hand_over
        self.state.spawn(self.drain(grace_s))

    # -- models ------------------------------------------------------------------------------------
    def register(self, entry: ModelConfigEntry, model_cfg: ModelConfig | None = None) -> Endpoint:
        """Make a model servable (idempotent for the same entry). ``model_cfg`` stands in for
        the model directory where there is none (the simulator; then ``size_gb`` is needed)."""
        s = self.state
        cfg = model_cfg or ModelConfig.from_dir(Path(entry.path))  # validates it; torch-free
        blocks = num_kv_blocks(cfg, EngineConfig(kv_cache_mb=s.gw.kv_cache_mb))
        s.cluster.register_model(entry.name, str(entry.path))
        size = entry.size_gb if entry.size_gb is not None else s.cluster.model_size_gb(entry.name)
        ep = Endpoint(entry, size, blocks)
        old = s.endpoints.get(entry.name)
        if old is not None:
            ep.queue, ep.instances = old.queue, old.instances
        s.put_endpoint(ep)
        scale = s.cluster_cfg.scale.size_scale
        if entry.size_gb is None and scale != 1:
            log.info("model %s registered: %.2f GB at the cluster's 1/%g scale (%.2f GB on disk, "
                     "counted x%g so that fetch times are a full-size model's), %d KV blocks "
                     "per worker", entry.name, size, scale, size / scale, scale, blocks)
        else:
            log.info("model %s registered: %.2f GB, %d KV blocks per worker", entry.name, size,
                     blocks)
        largest = max((g for srv in s.cluster_cfg.servers for g in srv.gpus), default=0.0)
        if size > largest:
            log.warning("model %s (%.1f GB) fits on no single GPU of this cluster (the largest has "
                        "%.1f GB); placements that need the whole model on one GPU (every policy "
                        "but static(p > 1)) will find no room", entry.name, size, largest)
        return ep

    async def warm_cache(self, name: str) -> None:
        """Put the whole model in every server's host cache (ServerlessLLM with cached model)."""
        await self.state.cluster.warm_cache(name)
        await self.fleet.refresh_cache()

    async def unregister(self, name: str) -> None:
        ep = self.state.drop_endpoint(name)
        for inst in list(ep.instances):
            await self.fleet.stop(inst, InstanceState.STOPPED)
        for req in ep.queue:
            req.events.put_nowait({"error": f"model {name} was removed", "status": 404})
        self.state.cluster.unregister_model(name)

    # -- the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        s = self.state
        last_cache_check = 0.0
        # not `while True`: on Python 3.11 wait_for can swallow a cancellation that arrives
        # as its inner wait completes, and the loop would tick on after close()
        while not s.closing:
            await s.woken(TICK_S)
            s.cluster.renew_lease()  # the processes of the cluster outlive us by the grace only
            self.placer.forget()
            now = s.clock()
            if self.preset.cache and now - last_cache_check > CACHE_CHECK_S:
                last_cache_check = now
                s.spawn(self.fleet.refresh_cache())
            s.nics.advance(now)
            for ep, only_wanting in s.due(now):
                ep.changed = False  # a change during its reconcile marks it again
                if not ep.queue and not ep.instances:
                    ep.wanting, ep.due = False, math.inf
                    continue  # nothing to do (most endpoints, most of the time)
                if only_wanting and not self.placer.may_place(ep, now):
                    continue  # its reconcile would only fail to place the instances it wants
                try:
                    self.reconcile(ep, now)
                except Exception:  # noqa: BLE001 - one endpoint must not stop the loop
                    ep.changed = True  # tried again next tick
                    log.exception("reconcile of %s failed", ep.name)

    def reconcile(self, ep: Endpoint, now: float) -> None:
        """One endpoint's tick: expire and dispatch its queue, then start and stop instances
        as `autoscale.decide` says."""
        self.router.expire(ep, now)
        self.router.assign(ep)
        if self.state.handing_over:
            return  # the instances are the new leader's to start and stop
        for inst in ep.instances:  # the requests that joined a starting instance's slots
            if inst.state is InstanceState.STARTING and ep.queue:
                self.state.tag_waiting(ep, inst)
        view = autoscale.EndpointView(len(ep.queue),
                                      tuple(autoscale.InstanceView.of(i) for i in ep.instances))
        decision = autoscale.decide(view, now, self.scaling)
        if decision.start:
            self.fleet.scale_up(ep, now, decision.start)
        for iid in decision.stop:
            inst = self.state.instances[iid]
            log.info("instance %s idle for %.0f s: scaling down", iid, now - inst.last_used)
            self.state.spawn(self.fleet.stop(inst, InstanceState.STOPPED))
        ep.wanting = decision.start > 0
        ep.due = self.state.due_at(ep, self.scaling.keep_alive_s)

    # -- the read API ------------------------------------------------------------------------------
    def models(self) -> dict[str, Endpoint]:
        """The registered models by name (a copy; the endpoints are live: read, do not write)."""
        return dict(self.state.endpoints)

    def model(self, name: str) -> Endpoint | None:
        return self.state.endpoints.get(name)

    def list_instances(self) -> list[Instance]:
        return list(self.state.instances.values())

    def instance(self, iid: str) -> Instance | None:
        return self.state.instances.get(iid)

    def request(self, rid: str) -> Request | None:
        """A request being served now."""
        return self.state.serving.get(rid)

    async def stop_instance(self, iid: str) -> None:
        """Stop one instance now (an operator's, or a test's, action)."""
        inst = self.state.instances.get(iid)
        if inst is not None:
            await self.fleet.stop(inst, InstanceState.STOPPED)

    def describe(self) -> dict:
        s = self.state
        return {"exec_type": self.gw.exec_type,
                "agents": s.cluster.agent_urls(),
                "warm_runtimes": s.cluster.warm_pool(),
                "models": {n: {"queued": len(ep.queue), "cold_starts": ep.cold_starts,
                               "size_gb": round(ep.size_gb, 3),
                               "instances": [i.id for i in ep.instances]}
                           for n, ep in s.endpoints.items()}}

