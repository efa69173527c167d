"""Placement and claims: what the cluster looks like to a placement policy, which policy
decides, and booking what it chose (GPU memory, a share of each stage's NIC) before anything
starts."""
from __future__ import annotations

import logging

from hydraserve.control.instance import Instance, Stage
from hydraserve.control.network import claim_gbits, fetch_deadline
from hydraserve.control.placement import POLICIES, PolicyName, place_cached, place_static
from hydraserve.control.snapshot import (ModelInfo, NodeSnapshot, Placement, PlacementRequest,
                                         stage_size_gb)
from hydraserve.control.state import ControlState, Endpoint

log = logging.getLogger("hydraserve.control")


class Placer:
    def __init__(self, state: ControlState):
        self.s = state
        self._snap: tuple[float, tuple[NodeSnapshot, ...]] | None = None
        self._nodes: dict[str, NodeSnapshot] = {}  # each node's last snapshot, reused if equal
        # a snapshot, with the most free memory of a GPU on any of its nodes and on those that
        # offer bandwidth
        self._room: tuple[tuple[NodeSnapshot, ...], float, float] = ((), 0.0, 0.0)

    def forget(self) -> None:
        """The ledgers may have changed: the next snapshot is taken anew."""
        self._snap = None

    def snapshot(self, now: float) -> tuple[NodeSnapshot, ...]:
        # One snapshot serves every endpoint of a tick (the reconcile loop is synchronous, so
        # only a claim in it changes the ledgers); hundreds of waiting endpoints would otherwise
        # rebuild it each.
        if self._snap is not None and self._snap[0] == now:
            return self._snap[1]
        s = self.s
        nodes = []
        for n in s.cluster_cfg.servers:
            gpus = s.gpus.snapshot_gpus(n.name)
            offered = s.nics.offered(n.name, now)
            cached = s.cached.get(n.name, frozenset())
            last = self._nodes.get(n.name)
            if last is None or last.gpus is not gpus or last.offered_gbps != offered or \
                    last.nic_gbps != n.nic_gbps or last.cached_models != cached:
                last = self._nodes[n.name] = NodeSnapshot(
                    name=n.name, gpus=gpus, nic_gbps=n.nic_gbps, offered_gbps=offered,
                    cached_models=frozenset(cached))
            nodes.append(last)
        snap = tuple(nodes)
        if snap != self._room[0]:
            self._room = (snap, max((n.rgpu for n in snap), default=0.0),
                          max((n.rgpu for n in snap if n.offered_gbps > 0), default=0.0))
        self._snap = (now, snap)
        return snap

    def may_place(self, ep: Endpoint, now: float) -> bool:
        """False when `place` would surely return None for ``ep`` now: no GPU (of a node
        offering bandwidth, for `ours`) has room for the whole model, which `ours`, `naive`
        and `cached` all need. A cheap test for the endpoints waiting for room tick after
        tick; True where it cannot tell (`static`)."""
        preset = self.s.preset
        if preset.policy not in (PolicyName.OURS, PolicyName.NAIVE):
            return True
        self.snapshot(now)
        _, anywhere, offering = self._room
        room = offering if preset.policy is PolicyName.OURS else anywhere
        if preset.cache:
            room = max(room, anywhere)
        return stage_size_gb(ep.size_gb, 1) <= room

    def request(self, ep: Endpoint, now: float, wanted: int) -> PlacementRequest:
        """What placement decides on now; NIC admission books fetches from the same object, so
        both use one TTFT model (one W, one SLO, the cluster's after_fetch_ms)."""
        wait_ms = (now - ep.queue[0].queued_at) * 1000 if ep.queue else 0.0
        e = ep.entry
        return PlacementRequest(
            model=ModelInfo(e.name, ep.size_gb, e.ttft_slo_s * 1000, e.tpot_slo_ms,
                            e.profiled_tpot_ms),
            nodes=self.snapshot(now), instances_wanted=wanted, wait_ms=wait_ms,
            max_p=self.s.preset.max_p, after_fetch_ms=self.s.cluster_cfg.scale.after_fetch_ms)

    def place(self, req: PlacementRequest) -> Placement | None:
        preset = self.s.preset
        if preset.cache:
            placed = place_cached(req)
            if placed is not None:
                return placed
        if preset.policy is PolicyName.STATIC:
            return place_static(req, preset.static_p)
        return POLICIES[preset.policy](req)

    def claim(self, ep: Endpoint, placement: Placement, req: PlacementRequest,
              now: float) -> Instance | None:
        """Book the placement's GPU memory and NIC shares and make its instance (STARTING);
        None when it no longer fits."""
        s = self.s
        self.forget()  # the ledgers change below
        iid = s.new_id(ep.name)
        stages = []
        try:
            for sp in placement.stages:
                claim = s.gpus.claim(sp.node, sp.gpu, sp.reserve_gb)
                stages.append(Stage(sp.rank, sp.node, sp.all_card, claim, f"{iid}-r{sp.rank}"))
        except ValueError as e:
            log.warning("placement of %s no longer fits: %s", ep.name, e)
            for st in stages:
                s.gpus.release(st.claim)
            return None
        if not placement.from_cache:
            deadline = fetch_deadline(now, req)
            for st in stages:
                st.fetch = s.nics.book(st.node, claim_gbits(ep.size_gb, placement.p), deadline,
                                       now)
        inst = Instance(iid, ep.name, placement, stages,
                        capacity=s.gw.batch_capacity * placement.p, created=now,
                        last_used=now, clock=s.clock)
        s.add(ep, inst)
        s.log("created", instance=iid, model=ep.name, p=placement.p, policy=placement.policy,
              from_cache=placement.from_cache,
              stages=[{"rank": st.rank, "node": st.node, "gpu": st.claim.gpu, "gb": st.claim.gb,
                       "all_card": st.all_card} for st in stages])
        log.info("instance %s: p=%d on %s (%s%s)", iid, placement.p,
                 ",".join(st.node for st in stages), placement.policy,
                 ", from cache" if placement.from_cache else "")
        return inst
