"""How fast the simulator runs the paper's end-to-end setting: the 1-hour trace (2,160 requests
at 0.6 req/s, CV 8, 384 endpoints) through the real control plane on the full-size hybrid
testbed, HydraServe execution type. Seeded; one warm-up run, then the median of --repeats.

    python benchmarks/sim.py [--repeats 3] [--json]

The last line with --json: {"requests", "endpoints", "wall_s", "requests_per_wall_s", "cpu_s",
"events", "events_per_cpu_s"}: cpu_s is the process's own CPU seconds per run (median), which
carries across machines and loads better than wall time; events are the lifecycle log's lines of
one run (instances created, ready, consolidated, deleted, requests ended, cold starts, fetches).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydraserve.sim.costmodel import CostModel  # noqa: E402
from hydraserve.sim.run import SimSetting, simulate  # noqa: E402
from hydraserve.testbeds import testbed, with_host_caches  # noqa: E402
from hydraserve.workload.make import make_trace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exec-type", default="hydraserve")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    meta, records = make_trace(cv_factor=8, rate=0.6, duration_s=3600, per_app=64, seed=0)
    setting = SimSetting(args.exec_type, with_host_caches(testbed("hybrid")),
                         CostModel.gpu_default())
    walls, cpus, events = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats + 1):  # the first run warms up (imports, caches)
            t0, c0 = time.perf_counter(), time.process_time()
            simulate(records, setting, Path(tmp) / str(i))
            if i:
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                events = sum(1 for _ in open(Path(tmp) / str(i) / "lifecycle.jsonl"))
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    print(f"{len(records)} requests, {meta['endpoints']} endpoints, {args.exec_type}: "
          f"median {wall:.2f} s of wall time over {args.repeats} runs "
          f"({', '.join(f'{w:.2f}' for w in walls)}); {cpu:.2f} s of CPU; {events} events")
    if args.json:
        print(json.dumps({"requests": len(records), "endpoints": meta["endpoints"],
                          "wall_s": round(wall, 3),
                          "requests_per_wall_s": round(len(records) / wall, 1),
                          "cpu_s": round(cpu, 3), "events": events,
                          "events_per_cpu_s": round(events / cpu, 1)}))


if __name__ == "__main__":
    main()
