"""Placement and claims: what the cluster looks like to a placement policy, which policy
decides, and booking what it chose (GPU memory, a share of each stage's NIC) before anything
starts."""
from __future__ import annotations

import logging

from hydraserve.control.instance import Instance, Stage
from hydraserve.control.network import claim_gbits, fetch_deadline
from hydraserve.control.placement import POLICIES, PolicyName, place_cached, place_static
from hydraserve.control.snapshot import ModelInfo, NodeSnapshot, Placement, PlacementRequest
from hydraserve.control.state import ControlState, Endpoint

log = logging.getLogger("hydraserve.control")


class Placer:
    def __init__(self, state: ControlState):
        self.s = state
        self._snap: tuple[float, tuple[NodeSnapshot, ...]] | None = None

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
        snap = tuple(NodeSnapshot(name=n.name, gpus=s.gpus.snapshot_gpus(n.name),
                                  nic_gbps=n.nic_gbps, offered_gbps=s.nics.offered(n.name, now),
                                  cached_models=frozenset(s.cached.get(n.name, ())))
                     for n in s.cluster_cfg.servers)
        self._snap = (now, snap)
        return snap

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
