"""Run a trace through the real control plane on the simulated cluster, in virtual time.

The controller, placement, NIC admission, GPU accounting and autoscaling are the gateway's own
(`hydraserve.control`), unchanged; only the cluster (`SimCluster`) and the clock (the
`VirtualTimeLoop`'s) differ. Requests enter where the gateway would submit them (after
tokenization), and their tokens are read where the gateway would stream them. The outputs are
those of a real run: results in the replay's JSONL format and the lifecycle log, so
`hydraserve workload analyze` and ae_scripts/figure9/11/13.py read them unchanged.
`SimSetting.failover` kills the controller mid-run and has a standby take over (failover.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from pathlib import Path

from hydraserve.config import ClusterConfig, GatewayConfig, ModelConfigEntry
from hydraserve.engine.config import Arch, ModelConfig
from hydraserve.sim.costmodel import CostModel, ModelShape
from hydraserve.sim.failover import Failover
from hydraserve.sim.loop import no_wall_clock, run
from hydraserve.workload.make import TraceRecord
from hydraserve.workload.replay import result_row, set_timing

log = logging.getLogger("hydraserve.sim")



def _shape(name: str, gb: float, layers: int, hidden: int) -> tuple[ModelShape, ModelConfig]:
    # the ModelConfig only sizes the KV cache the control plane reports (head_dim 128)
    return (ModelShape(name, gb, layers),
            ModelConfig(Arch.LLAMA, 32000, hidden, layers, hidden // 128, hidden // 128, 128,
                        hidden * 8 // 3, 4096))


# The paper's models: sizes of PAPER.md 10 (Llama-2-13B is 25 GB in the end-to-end set), layer
# counts and hidden sizes of their published configs.
PAPER_SHAPES = {
    "Llama2-7B": _shape("Llama2-7B", 13.0, 32, 4096),
    "Llama2-13B": _shape("Llama2-13B", 25.0, 40, 5120),
    "OPT-2.7B": _shape("OPT-2.7B", 7.0, 32, 2560),
    "OPT-6.7B": _shape("OPT-6.7B", 13.0, 32, 4096),
    "OPT-13B": _shape("OPT-13B", 26.0, 40, 5120),
    "Llama3-8B": _shape("Llama3-8B", 15.0, 32, 4096),
    "Falcon-7B": _shape("Falcon-7B", 13.0, 32, 4544 // 128 * 128),
}
GUARDED = ("hydraserve.control.controller", "hydraserve.control.instance",
           "hydraserve.control.state", "hydraserve.control.router", "hydraserve.control.fleet",
           "hydraserve.control.placer", "hydraserve.control.consolidation",
           "hydraserve.control.network", "hydraserve.control.gpu",
           "hydraserve.control.placement", "hydraserve.control.lifecycle",
           "hydraserve.control.adoption", "hydraserve.sim.cluster", "hydraserve.sim.network",
           "hydraserve.sim.failover")


@dataclasses.dataclass(frozen=True)
class SimSetting:
    exec_type: str
    cluster: ClusterConfig
    cost: CostModel
    keep_alive_s: float = 30.0
    static_p: int | None = None
    timeout_s: float = 600.0  # a request unanswered by then is recorded as failed
    sizes_gb: tuple[tuple[str, float], ...] = ()  # model -> GB, instead of PAPER_SHAPES'
    device: str | None = None  # "cpu": every server computes as the local testbed's CPU
    failover: Failover | None = None  # the leader dies and a standby takes over (failover.py)


async def _client(lead, i: int, r: TraceRecord, res: dict, timeout_s: float) -> None:
    """One request of the trace, sent to the leader (`failover.Leadership`): once, or again to
    a new leader after a failover broke or refused it (the client's retry)."""
    from hydraserve.control.controller import QueueFull
    from hydraserve.control.instance import Request
    from hydraserve.sim.failover import BROKEN

    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, r.time - loop.time()))
    sent = loop.time()
    first = last = req = controller = None
    n = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:  # one pass per leader it is sent to
                controller = lead.controller
                if controller is None:  # no leader serves: the connection is refused
                    res.setdefault("broken", "refused")
                    if not lead.retry:
                        res["error"] = BROKEN[res["broken"]]
                        break
                    controller = await lead.leading()
                    res["retried"] = True
                req = Request(f"sim-{i}", r.endpoint, [1] * r.prompt_tokens,
                              {"max_tokens": r.max_tokens, "temperature": 0.0,
                               "ignore_eos": True}, arrival=loop.time())
                try:
                    controller.submit(req)
                except QueueFull as e:
                    res.update(status=429, error=f"too many requests queued: {e}")
                    return
                res["status"] = 200
                lead.open[i] = req
                first = last = broken = None
                n = 0
                while True:
                    item = await req.events.get()
                    now = loop.time() - sent
                    if "broken" in item:  # the leader died: the connection broke
                        broken = item["broken"]
                        break
                    if "error" in item:
                        res["status"] = item.get("status", 500)
                        res["error"] = item["error"]
                        break
                    n += 1
                    first = now if first is None else first
                    last = now
                    if item.get("finish_reason"):
                        res["finish_reason"] = item["finish_reason"]
                        break
                del lead.open[i]
                if broken is None:
                    break
                res["broken"] = broken
                first = last = None  # the tokens of a broken stream are not the answer
                n = 0
                if not lead.retry:
                    res["error"] = BROKEN[broken]
                    break
    except TimeoutError:
        res["error"] = f"no complete answer within {timeout_s:.0f} s"
        lead.open.pop(i, None)
        if req is not None:
            controller.cancel(req)
    set_timing(res, [] if first is None else [first, last], n)


def _entries(records: list[TraceRecord], shapes: dict) -> list[tuple[ModelConfigEntry,
                                                                     ModelConfig]]:
    """What the control plane registers: one entry per endpoint, with its SLOs."""
    slos = {r.endpoint: (r.ttft_slo_s, r.tpot_slo_ms) for r in records}
    models = sorted({r.endpoint: r.model for r in records}.items())
    return [(ModelConfigEntry(ep, f"sim:{m}", ttft_slo_s=slos[ep][0], tpot_slo_ms=slos[ep][1],
                              size_gb=shapes[ep].size_gb), PAPER_SHAPES[m][1])
            for ep, m in models]


async def _leader(cluster, cfg: ClusterConfig, gw: GatewayConfig, entries, warm: bool):
    """A controller on ``cluster``, its models registered (their host caches warmed, with
    ``warm``), started: it adopts what runs in the cluster."""
    from hydraserve.control.controller import Controller

    loop = asyncio.get_running_loop()
    controller = Controller.build(cluster, cfg, gw, clock=loop.time, lifecycle_clock=loop.time)
    for entry, model_cfg in entries:
        controller.register(entry, model_cfg=model_cfg)
        if warm:
            await controller.warm_cache(entry.name)
    await controller.start()
    return controller


async def _simulate(records: list[TraceRecord], s: SimSetting, lifecycle: Path,
                    stats: dict) -> list[dict]:
    from hydraserve.control.presets import resolve
    from hydraserve.sim.cluster import SimCluster
    from hydraserve.sim.failover import Leadership

    p = resolve(s.exec_type, s.static_p)
    cfg = s.cluster.with_host_cache(p.cache)
    cfg = dataclasses.replace(cfg, share=cfg.share and p.share_gpus)
    models = sorted({r.endpoint: r.model for r in records}.items())
    sizes = dict(s.sizes_gb)
    shapes = {ep: dataclasses.replace(PAPER_SHAPES[m][0], name=ep,
                                      size_gb=sizes.get(m, PAPER_SHAPES[m][0].size_gb))
              for ep, m in models}
    gpu_of = {n.name: s.device for n in cfg.servers} if s.device else None
    cluster = SimCluster(cfg, shapes, s.cost, gpu_of=gpu_of)
    gw = GatewayConfig(exec_type=s.exec_type, static_p=s.static_p, keep_alive_s=s.keep_alive_s,
                       lifecycle_log=str(lifecycle), max_queue=10**6)
    entries = _entries(records, shapes)
    lead = Leadership(await _leader(cluster, cfg, gw, entries, p.warm_cache), s.failover)
    results = [{**result_row(i, r, r.time), "sent": r.time, "sent_wall": r.time}
               for i, r in enumerate(records)]
    clients = [_client(lead, i, r, results[i], s.timeout_s) for i, r in enumerate(records)]
    if s.failover is not None:  # the standby registers the same models and warms nothing
        clients.append(lead.run(cluster, lambda: _leader(cluster, cfg, gw, entries, False)))
    try:
        await asyncio.gather(*clients)
        await asyncio.sleep(s.keep_alive_s + 1)  # let idle instances scale to zero
    finally:
        if lead.controller is not None:
            await lead.controller.close()
    stats.update(lead.stats)
    return results


def simulate(records: list[TraceRecord], setting: SimSetting, out_dir: str | Path,
             meta: dict | None = None) -> tuple[list[dict], dict]:
    """Simulate ``records``; write ``replay.jsonl`` and ``lifecycle.jsonl`` into ``out_dir``.
    Returns (results, stats): stats has the wall time, the request count and, with a failover
    (``setting.failover``), what the dead leader left and its successor adopted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lifecycle = out / "lifecycle.jsonl"
    lifecycle.unlink(missing_ok=True)
    wall = time.perf_counter()
    failover: dict = {}
    with no_wall_clock(GUARDED):
        results = run(_simulate(list(records), setting, lifecycle, failover))
    wall = time.perf_counter() - wall
    with open(out / "replay.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": {**(meta or {}), "simulated": True,
                                     "requests": len(results)}}) + "\n")
        for r in results:
            f.write(json.dumps(r) + "\n")
    stats = {"wall_s": round(wall, 3), "requests": len(results)}
    if setting.failover is not None:
        stats["failover"] = failover  # what the leader left and its successor adopted
    return results, stats
