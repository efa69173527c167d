"""A control-plane failover in a simulation: the leader dies at ``at_s`` (seconds of the trace)
and a standby leads ``takeover_s`` later, on the same simulated cluster and virtual clock.

The leader dies as a SIGKILLed gateway does (`kill`): its reconcile loop and every task it
runs stop at once (cancelled, as `Controller.close` cancels them, but no instance is stopped:
the cluster's workers keep running) and it writes nothing more to the lifecycle log. The
requests it had queued are lost and the streams it relayed break: their clients see a broken
connection. While no leader serves, a request's connection is refused. At ``at_s +
takeover_s`` a new `Controller` is built on the same cluster with the same configuration, the
models are registered, and its start adopts the ready workers (`hydraserve.control.adoption`)
and stops the rest; its lifecycle log appends to the same file.

The client retries (the openai client retries connection errors by itself; ``retry``, on by
default): a request whose connection broke or was refused is sent again, whole, to the new
leader once it leads, and its TTFT still counts from its first send. Without it, each such
request fails. A result row of a request that saw the failover says how (``broken``:
"queued", "stream" or "refused") and whether it was sent again (``retried``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence

WINDOW_S = 300.0  # "right after the failover": the 5 minutes from its start
TAKEOVER_WINDOW_S = 30.0  # cold starts in the first 30 s the new leader leads
BROKEN = {"queued": "connection failed: the control plane died while the request was queued",
          "stream": "connection failed: the control plane died while relaying the stream",
          "refused": "connection refused: no control plane leads (a failover)"}


@dataclasses.dataclass(frozen=True)
class Failover:
    at_s: float  # T: when the leader dies, seconds from the trace's start
    takeover_s: float  # D: how long until the standby leads
    retry: bool = True  # the client sends a broken or refused request again to the new leader

    def __post_init__(self) -> None:
        if self.at_s < 0 or self.takeover_s < 0:
            raise ValueError("a failover needs at_s >= 0 and takeover_s >= 0")


def kill(controller) -> tuple[set[str], set[str]]:
    """``controller`` dies as a SIGKILLed process: nothing more is logged, its loop and tasks
    stop, its instances' workers keep running. Returns the ids of the requests it had queued
    and of those it was streaming."""
    s = controller.state
    if s.lifecycle is not None:  # a killed process writes nothing, not even request_end
        s.lifecycle.close()
        s.lifecycle = None
    s.closing = True
    queued = {r.id for ep in s.endpoints.values() for r in ep.queue}
    streams = set(s.serving) - queued
    for t in list(s.tasks):
        t.cancel()
    return queued, streams


class Leadership:
    """Which controller leads, for the simulated clients; runs the failover, if any."""

    def __init__(self, controller, failover: Failover | None = None):
        self.controller = controller  # None while no leader serves
        self.failover = failover
        self.retry = failover is not None and failover.retry
        self.open: dict[int, object] = {}  # client index -> its request at the leader
        self._leads = asyncio.Event()
        self.stats: dict = {}

    async def leading(self):
        """The leader, once one leads."""
        await self._leads.wait()
        return self.controller

    async def run(self, cluster, new_leader: Callable[[], Awaitable[object]]) -> None:
        """Kill the leader at the failover's time; ``new_leader()`` builds, registers and
        starts its successor after the takeover."""
        fo = self.failover
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, fo.at_s - loop.time()))
        self._leads.clear()
        old, self.controller = self.controller, None
        queued, streams = kill(old)
        for i in sorted(self.open):  # their clients see the connection break, in trace order
            req = self.open[i]
            req.events.put_nowait({"broken": "queued" if req.id in queued else "stream"})
        self.stats.update(killed_at_s=round(loop.time(), 6), queued_at_kill=len(queued),
                          streams_at_kill=len(streams))
        await asyncio.sleep(fo.takeover_s)
        workers = await cluster.list_workers()
        new = await new_leader()  # adopts what runs before it admits a request
        insts = new.list_instances()
        self.stats.update(
            leads_at_s=round(loop.time(), 6), workers_at_takeover=len(workers),
            adopted_instances=len(insts),
            adopted_workers=sum(len(i.stages) for i in insts),
            stopped_workers=sum(1 for wid in workers if not cluster.worker_alive(wid)))
        self.controller = new
        self._leads.set()


# -- the report ------------------------------------------------------------------------------
def _in(t: float, lo: float, hi: float) -> bool:
    return lo <= t < hi


def window(results: Sequence[dict], events: Sequence[dict], lo: float, hi: float) -> dict:
    """Requests scheduled and cold starts ("created" instances) in [lo, hi)."""
    from hydraserve.workload.analyze import attainment, ttft_ok

    rs = [r for r in results if _in(r["scheduled"], lo, hi)]
    return {"from_s": lo, "to_s": hi, "requests": len(rs),
            "failed": sum(1 for r in rs if r.get("error") is not None),
            "ttft_attainment": attainment(rs, ttft_ok),
            "cold_starts": sum(1 for e in events
                               if e.get("event") == "created" and _in(e["t"], lo, hi))}


def _windows(results, events, fo: Failover) -> dict:
    t, d = fo.at_s, fo.takeover_s
    return {"after_failover": window(results, events, t, t + WINDOW_S),
            "cold_starts_after_takeover": window(results, events, t + d,
                                                 t + d + TAKEOVER_WINDOW_S)["cold_starts"]}


def report(fo: Failover, results: Sequence[dict], events: Sequence[dict], stats: dict,
           baseline: tuple[Sequence[dict], Sequence[dict]] | None = None) -> dict:
    """The summary's "failover" block: what the failover cost, against the same trace without
    one (``baseline``: its results and lifecycle events) where given."""
    from hydraserve.workload.analyze import attainment, ttft_ok

    saw = {k: [r for r in results if r.get("broken") == k] for k in BROKEN}
    hit = [r for k in BROKEN for r in saw[k]]
    out = {"at_s": fo.at_s, "takeover_s": fo.takeover_s, "client_retry": fo.retry,
           "lost": {"queued": len(saw["queued"]), "streams": len(saw["stream"])},
           "refused_during_takeover": len(saw["refused"]),
           "failed_without_retry": len(hit),
           "retried": sum(1 for r in hit if r.get("retried")),
           "failed_of_those": sum(1 for r in hit if r.get("error") is not None),
           **stats,
           "requests": len(results),
           "failed": sum(1 for r in results if r.get("error") is not None),
           "cold_starts": sum(1 for e in events if e.get("event") == "created"),
           "ttft_attainment": attainment(results, ttft_ok),
           **_windows(results, events, fo)}
    out["met_ttft_slo_of_those"] = sum(1 for r in hit if ttft_ok(r))
    if baseline is not None:
        b_results, b_events = baseline
        out["without_failover"] = {
            "failed": sum(1 for r in b_results if r.get("error") is not None),
            "cold_starts": sum(1 for e in b_events if e.get("event") == "created"),
            "ttft_attainment": attainment(b_results, ttft_ok),
            **_windows(b_results, b_events, fo)}
        out["ttft_outcome_changes"] = changes(fo, results, b_results)
    return out


def changes(fo: Failover, results: Sequence[dict], baseline: Sequence[dict]) -> dict:
    """Requests whose TTFT SLO outcome differs from the same request's without the failover
    ("worse": met it there, not here), by when they were scheduled: before the failover, in
    the window from it, after. Changes after the window are the simulation's sensitivity to
    any perturbation (placements and cold starts diverge), not the failover's own cost."""
    from hydraserve.workload.analyze import ttft_ok

    t = fo.at_s
    spans = {"before": (-math.inf, t), "window": (t, t + WINDOW_S),
             "after": (t + WINDOW_S, math.inf)}
    out = {k: {"worse": 0, "better": 0} for k in spans}
    for r, b in zip(results, baseline):
        got, had = ttft_ok(r), ttft_ok(b)
        if got != had:
            span = next(k for k, (lo, hi) in spans.items() if _in(r["scheduled"], lo, hi))
            out[span]["worse" if had else "better"] += 1
    return out


def format_report(rep: dict) -> str:
    """A few lines of the "failover" block."""
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    w = rep["after_failover"]
    lines = [f"failover at {rep['at_s']:g} s, the standby leads {rep['takeover_s']:g} s later: "
             f"{rep['lost']['queued']} queued and {rep['lost']['streams']} streaming requests "
             f"lost, {rep['refused_during_takeover']} refused meanwhile; "
             f"{rep['retried']} sent again (client retry {'on' if rep['client_retry'] else 'off'}"
             f"), {rep['failed_of_those']} of them failed",
             f"the new leader adopted {rep.get('adopted_instances', 0)} instance(s) "
             f"({rep.get('adopted_workers', 0)} workers) and stopped "
             f"{rep.get('stopped_workers', 0)} worker(s)",
             f"TTFT attainment {fmt(rep['ttft_attainment']['total'])}% overall, "
             f"{fmt(w['ttft_attainment']['total'])}% in the {WINDOW_S / 60:g} min from the "
             f"failover; cold starts {rep['cold_starts']} ({w['cold_starts']} in those "
             f"{WINDOW_S / 60:g} min)"]
    b = rep.get("without_failover")
    if b:
        bw = b["after_failover"]
        lines.append(f"without the failover: TTFT attainment {fmt(b['ttft_attainment']['total'])}"
                     f"% overall, {fmt(bw['ttft_attainment']['total'])}% in the same "
                     f"{WINDOW_S / 60:g} min; cold starts {b['cold_starts']} "
                     f"({bw['cold_starts']} in those {WINDOW_S / 60:g} min)")
    return "\n".join(lines)
