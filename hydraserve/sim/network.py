"""Fluid model of the fetch path: every server's NIC is shared equally by its active flows (as
the storage agent shares it), and the remote store's egress caps the sum of all flows (scaled
down proportionally when exceeded). Event driven: rates are recomputed whenever a flow starts
or ends, and one timer fires at the next completion. Bandwidth in Gbps, sizes in gigabits."""
from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Mapping

_EPS = 1e-9


class Flow:
    """One transfer onto ``node``; ``done`` resolves when its last bit arrived."""

    def __init__(self, fid: int, node: str, gbits: float, loop: asyncio.AbstractEventLoop):
        self.id, self.node, self.total, self.remaining = fid, node, gbits, gbits
        self.rate = 0.0
        self.started = loop.time()
        self.done: asyncio.Future = loop.create_future()

    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else 1.0 - self.remaining / self.total


class FluidNetwork:
    def __init__(self, nic_gbps: Mapping[str, float], egress_gbps: float | None = None,
                 flow_cap: float | None = None):
        """``flow_cap``: no flow moves faster than this (a CPU pool: a job uses one core)."""
        self.nic = dict(nic_gbps)
        self.egress = egress_gbps
        self.flow_cap = flow_cap
        self.flows: dict[int, Flow] = {}
        self._ids = itertools.count(1)
        self._last: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, node: str, gbits: float) -> Flow:
        loop = asyncio.get_running_loop()
        if node not in self.nic:
            raise ValueError(f"unknown node {node!r}")
        self._advance(loop.time())
        flow = Flow(next(self._ids), node, max(0.0, gbits), loop)
        if flow.total <= _EPS:
            flow.done.set_result(loop.time())
            return flow
        self.flows[flow.id] = flow
        self._reschedule(loop)
        return flow

    def cancel(self, flow: Flow) -> None:
        if self.flows.pop(flow.id, None) is not None:
            loop = asyncio.get_running_loop()
            self._advance(loop.time())
            if not flow.done.done():
                flow.done.cancel()
            self._reschedule(loop)

    def _advance(self, now: float) -> None:
        if self._last is not None and now > self._last:
            dt = now - self._last
            for f in self.flows.values():
                f.remaining = max(0.0, f.remaining - f.rate * dt)
        self._last = now

    def _reschedule(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for fid in [i for i, f in self.flows.items() if f.remaining <= _EPS]:
            f = self.flows.pop(fid)
            if not f.done.done():
                f.done.set_result(now)
        per_node: dict[str, int] = {}
        for f in self.flows.values():
            per_node[f.node] = per_node.get(f.node, 0) + 1
        for f in self.flows.values():
            f.rate = self.nic[f.node] / per_node[f.node]
            if self.flow_cap is not None:
                f.rate = min(f.rate, self.flow_cap)
        total = sum(f.rate for f in self.flows.values())
        if self.egress and total > self.egress:
            for f in self.flows.values():
                f.rate *= self.egress / total
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.flows:
            wait = min(f.remaining / f.rate for f in self.flows.values())
            self._timer = loop.call_at(now + max(wait, 0.0), self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = None
        self._advance(loop.time())
        for f in self.flows.values():  # float residue: what is due now is done
            if f.rate > 0 and f.remaining / f.rate < 1e-7:
                f.remaining = 0.0
        self._reschedule(loop)


def transfer_s(gbits: float, gbps: float) -> float:
    """Seconds to move ``gbits`` at ``gbps`` alone."""
    return math.inf if gbps <= 0 else gbits / gbps
