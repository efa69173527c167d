"""Run a trace through the real control plane on the simulated cluster, in virtual time.

The controller, placement, NIC admission, GPU accounting and autoscaling are the gateway's own
(`hydraserve.control`), unchanged; only the cluster (`SimCluster`) and the clock (the
`VirtualTimeLoop`'s) differ. Requests enter where the gateway would submit them (after
tokenization), and their tokens are read where the gateway would stream them. The outputs are
those of a real run: results in the replay's JSONL format and the lifecycle log, so
`hydraserve workload analyze` and ae_scripts/figure9/11/13.py read them unchanged.
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
           "hydraserve.sim.cluster", "hydraserve.sim.network")


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


async def _client(controller, i: int, r: TraceRecord, res: dict, timeout_s: float) -> None:
    from hydraserve.control.controller import QueueFull
    from hydraserve.control.instance import Request

    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, r.time - loop.time()))
    sent = loop.time()
    req = Request(f"sim-{i}", r.endpoint, [1] * r.prompt_tokens,
                  {"max_tokens": r.max_tokens, "temperature": 0.0, "ignore_eos": True},
                  arrival=sent)
    try:
        controller.submit(req)
    except QueueFull as e:
        res.update(status=429, error=f"too many requests queued: {e}")
        return
    res["status"] = 200
    first = last = None
    n = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                item = await req.events.get()
                now = loop.time() - sent
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
    except TimeoutError:
        res["error"] = f"no complete answer within {timeout_s:.0f} s"
        controller.cancel(req)
    set_timing(res, [] if first is None else [first, last], n)


async def _simulate(records: list[TraceRecord], s: SimSetting, lifecycle: Path) -> list[dict]:
    from hydraserve.control.controller import Controller
    from hydraserve.control.presets import resolve
    from hydraserve.sim.cluster import SimCluster

    loop = asyncio.get_running_loop()
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
    controller = Controller.build(cluster, cfg, gw, clock=loop.time, lifecycle_clock=loop.time)
    slos = {r.endpoint: (r.ttft_slo_s, r.tpot_slo_ms) for r in records}
    for ep, m in models:
        controller.register(ModelConfigEntry(ep, f"sim:{m}", ttft_slo_s=slos[ep][0],
                                             tpot_slo_ms=slos[ep][1],
                                             size_gb=shapes[ep].size_gb),
                            model_cfg=PAPER_SHAPES[m][1])
        if p.warm_cache:
            await controller.warm_cache(ep)
    await controller.start()
    results = [{**result_row(i, r, r.time), "sent": r.time, "sent_wall": r.time}
               for i, r in enumerate(records)]
    try:
        await asyncio.gather(*(_client(controller, i, r, results[i], s.timeout_s)
                               for i, r in enumerate(records)))
        await asyncio.sleep(s.keep_alive_s + 1)  # let idle instances scale to zero
    finally:
        await controller.close()
    return results


def simulate(records: list[TraceRecord], setting: SimSetting, out_dir: str | Path,
             meta: dict | None = None) -> tuple[list[dict], dict]:
    """Simulate ``records``; write ``replay.jsonl`` and ``lifecycle.jsonl`` into ``out_dir``.
    Returns (results, stats) where stats has the wall time and the virtual end time."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lifecycle = out / "lifecycle.jsonl"
    lifecycle.unlink(missing_ok=True)
    wall = time.perf_counter()
    with no_wall_clock(GUARDED):
        results = run(_simulate(list(records), setting, lifecycle))
    wall = time.perf_counter() - wall
    with open(out / "replay.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": {**(meta or {}), "simulated": True,
                                     "requests": len(results)}}) + "\n")
        for r in results:
            f.write(json.dumps(r) + "\n")
    return results, {"wall_s": round(wall, 3), "requests": len(results)}
