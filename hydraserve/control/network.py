"""NIC admission (PAPER.md section 5): which share of a node's NIC a new fetch may take.

Each node's NIC is shared equally among its active fetches. A new fetch is admitted at the share
bw / (n + 1) only if every ongoing fetch still meets its deadline at that share; otherwise the
node offers 0. Time is passed in explicitly as ``now`` (seconds, any monotonic origin), so the
simulator can run the ledger on virtual time and the gateway on the wall clock. Bandwidth is in
Gbps, fetch sizes in gigabits (Gb).

Interpretations made here:
- A fetch already past its deadline with bits left cannot meet it at any share, so it blocks
  new fetches on its node until it completes or is finished (the rule taken literally).
- When a fetch completes between two calls, the others speed up from that instant (the share
  is recomputed at every completion, not only at the next call).
- Booking does not check admission: the caller asks `offered` first. Consolidation fetches are
  booked with `exclusive`, which needs an idle node and then makes the node offer 0.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hydraserve.control.snapshot import NET_SLACK, PlacementRequest

_EPS_GBIT = 1e-9  # remaining bits below this count as done (float residue)


@dataclass(eq=False)
class Fetch:
    """One active transfer onto a node. The ledger owns it and lowers ``remaining_gb``
    (gigabits) as time advances; ``deadline`` is an absolute time in seconds or None (never
    blocks admission); ``exclusive`` fetches make their node offer 0 while active."""

    id: int
    node: str
    remaining_gb: float
    deadline: float | None
    exclusive: bool = False


def claim_gbits(size_gb: float, p: int) -> float:
    """Gigabits booked on each node for one stage: S * 8 for p = 1, else S * 8 / p / 0.9."""
    if p <= 1:
        return size_gb * 8
    return size_gb * 8 / p / NET_SLACK


def fetch_deadline(now: float, req: PlacementRequest) -> float:
    """Absolute deadline (s) of a fetch started at ``now`` for the placement decided on ``req``:
    now + SLO - W - after_fetch_ms, with the very W, SLO and after-fetch constant that the
    policy's TTFT model used (PAPER.md 5 writes the constant as 2000 ms: the artifact's)."""
    return now + (req.model.ttft_slo_ms - req.wait_ms - req.after_fetch_ms) / 1000


class NicLedger:
    """Active fetches per node NIC, built from ``{node: bandwidth in Gbps}``."""

    def __init__(self, bandwidth_gbps: Mapping[str, float]):
        self._bw = {node: float(bw) for node, bw in bandwidth_gbps.items()}
        self._active: dict[str, dict[int, Fetch]] = {node: {} for node in self._bw}
        self._done: list[Fetch] = []
        self._ids = itertools.count(1)
        self._now: float | None = None

    def bandwidth(self, node: str) -> float:
        """The node's NIC bandwidth (Gbps)."""
        return self._bw[self._node(node)]

    def active(self, node: str) -> tuple[Fetch, ...]:
        """The node's active fetches (as of the last call that passed ``now``)."""
        return tuple(self._active[self._node(node)].values())

    def offered(self, node: str, now: float) -> float:
        """The share (Gbps) a new fetch would get on ``node``: bw / (n + 1), or 0 if an
        exclusive fetch is active or some ongoing fetch would then miss its deadline."""
        self._progress(now)
        fetches = self._active[self._node(node)].values()
        if any(f.exclusive for f in fetches):
            return 0.0
        share = self._bw[node] / (len(fetches) + 1)
        for f in fetches:
            if f.deadline is not None and (f.deadline - now) * share < f.remaining_gb:
                return 0.0
        return share

    def book(self, node: str, gbits: float, deadline: float | None, now: float) -> Fetch:
        """Start a fetch of ``gbits`` on ``node`` (see `claim_gbits`, `fetch_deadline`)."""
        return self._start(node, gbits, deadline, now, exclusive=False)

    def exclusive(self, node: str, gbits: float, now: float) -> Fetch | None:
        """Book ``node`` for a consolidation fetch of ``gbits`` (``math.inf``: held until
        `finish`). None when a fetch is active there; while it runs the node offers 0."""
        if not self.idle([node], now):
            return None
        return self._start(node, gbits, None, now, exclusive=True)

    def advance(self, now: float) -> list[Fetch]:
        """Progress every fetch to ``now`` at its equal share; return the fetches that
        completed since the previous `advance` (including ones noticed by other calls)."""
        self._progress(now)
        done, self._done = self._done, []
        return done

    def finish(self, fetch: Fetch) -> None:
        """Remove a fetch before the model says it completed (done early, or cancelled)."""
        if self._active[self._node(fetch.node)].pop(fetch.id, None) is None:
            raise ValueError(f"fetch {fetch.id} is not active on node {fetch.node}")

    def idle(self, nodes: Iterable[str], now: float) -> bool:
        """True when no fetch is active on any of ``nodes`` (KV migration waits for this)."""
        self._progress(now)
        return all(not self._active[self._node(n)] for n in nodes)

    def _start(self, node: str, gbits: float, deadline: float | None, now: float,
               exclusive: bool) -> Fetch:
        if gbits <= 0:
            raise ValueError(f"a fetch needs a positive size, got {gbits} Gb")
        self._progress(now)
        fetch = Fetch(id=next(self._ids), node=node, remaining_gb=gbits, deadline=deadline,
                      exclusive=exclusive)
        self._active[self._node(node)][fetch.id] = fetch
        return fetch

    def _progress(self, now: float) -> None:
        # Time never runs backwards here: an earlier ``now`` (another clock's jitter) is a no-op.
        if self._now is not None and now > self._now:
            for node, fetches in self._active.items():
                if fetches:  # (an idle node has nothing to drain)
                    self._drain(self._bw[node], fetches, now - self._now)
        if self._now is None or now > self._now:
            self._now = now

    def _drain(self, bw: float, fetches: dict[int, Fetch], dt: float) -> None:
        # Equal shares, recomputed at each completion inside the interval.
        while fetches and dt > 0 and bw > 0:
            share = bw / len(fetches)
            first = min(f.remaining_gb for f in fetches.values())
            if first / share > dt:  # nothing completes before the interval ends
                for f in fetches.values():
                    f.remaining_gb -= share * dt
                return
            dt -= first / share
            for f in fetches.values():
                f.remaining_gb -= first  # every fetch moved share * (first / share) = first
            for fid in [i for i, f in fetches.items() if f.remaining_gb <= _EPS_GBIT]:
                self._done.append(fetches.pop(fid))

    def _node(self, node: str) -> str:
        if node not in self._bw:
            raise ValueError(f"unknown node {node!r}")
        return node
