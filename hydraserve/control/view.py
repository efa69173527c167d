"""The operator's view of the control plane, read only: the cluster's resources (GPU memory and
NIC bookings per server, warm runtimes), the latest cold starts, what a waiting request waits
for, and a subscription to the control plane's events (the gateway's metrics use it)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from hydraserve.control.coldstart import ColdStart
from hydraserve.control.instance import Instance, InstanceState, Request
from hydraserve.control.state import ControlState


class OperatorView:
    def __init__(self, state: ControlState):
        self.s = state

    def subscribe(self, observe: Callable[[str, dict], None]) -> None:
        """Call ``observe(event, fields)`` for each event `ControlState.emit` sends."""
        self.s.observers.append(observe)

    def cold_starts(self, n: int | None = None) -> list[ColdStart]:
        """The latest cold starts, newest first (records: live while they go on)."""
        return self.s.coldstarts.recent(n)

    def cold_start(self, iid: str) -> ColdStart | None:
        return self.s.coldstarts.get(iid)

    def resources(self) -> list[dict]:
        """Per server: each GPU's memory (total, booked, free; in the cluster's GB), the NIC
        (its bandwidth, its active fetch bookings) and the warm runtimes."""
        s = self.s
        pool = s.cluster.warm_pool()
        out = []
        for node in s.cluster_cfg.servers:
            claims = s.gpus.claims([node.name])
            gpus = [{"gpu": g.index, "total_gb": round(g.total_gb, 3),
                     "booked_gb": round(sum(c.gb for c in claims if c.gpu == g.index), 3),
                     "free_gb": round(g.free_gb, 3)}
                    for g in s.gpus.snapshot_gpus(node.name)]
            fetches = s.nics.active(node.name)
            out.append({"server": node.name, "gpus": gpus, "nic_gbps": node.nic_gbps,
                        "fetches": len(fetches),
                        "exclusive": any(f.exclusive for f in fetches),
                        "warm": pool.get(node.name, {})})
        return out

    async def placed(self, req: Request, timeout: float) -> None:
        """Until ``req`` has an instance (one started for it, or one it went to), at most
        ``timeout`` seconds (it may wait in the queue for room in the cluster)."""
        try:
            await asyncio.wait_for(req.placed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def waits_for(self, req: Request) -> Instance | None:
        """The instance a request is waiting for, if it waits for a cold start."""
        s = self.s
        iid = req.instance or req.cold_start
        inst = s.instances.get(iid) if iid else None
        if inst is None or "first_token" in inst.timeline and req.instance == inst.id:
            return None
        return inst

    async def progress(self, req: Request) -> str | None:
        """One line on what ``req`` waits for: its cold start's phase and fetch ("cold start
        m-3: fetching 41% on 3 servers"), room in the cluster, or None (it does not wait)."""
        inst = self.waits_for(req)
        if inst is None:
            if req.instance is None and not req.cancelled and req.cold_start is None:
                return "queued: waiting for room in the cluster"
            return None
        t = inst.timeline
        fractions = []  # per stage: how much of its image has arrived
        rec = self.s.coldstarts.get(inst.id)
        if rec is not None and not rec.from_cache and "weights_ready" not in t:
            p = inst.placement.p
            for st in inst.stages:
                trace = rec.stage(st.rank)
                if trace is not None and trace.fetch_bytes is not None:
                    fractions.append(1.0)
                    continue
                try:
                    stats = await self.s.cluster.fetch_stats(
                        st.node, inst.model, "full" if p == 1 else "stage", p, st.rank)
                except Exception:  # noqa: BLE001 - progress is best effort
                    stats = None
                if stats and stats["length"]:
                    fractions.append(1.0 if stats["done"] else
                                     stats["received"] / stats["length"])
        if inst.state is InstanceState.STARTING:
            phase = ("joining the pipeline" if "workers_spawned" in t and inst.stages and
                     all(st.client is not None for st in inst.stages) else
                     "starting workers" if "workers_spawned" in t else "placing")
        elif inst.state is InstanceState.READY:
            phase = "loading weights" if "weights_ready" not in t else "first token"
        else:
            phase = inst.state.value
        line = f"cold start {inst.id}: {phase}"
        if fractions:
            n = len(fractions)
            line += f"; fetching {int(100 * sum(fractions) / n)}% on {n} " \
                    f"server{'s' if n > 1 else ''}"
        return line
