"""A control-plane failover in the paper's hour-long setting, simulated: the leader dies at 30
minutes and a standby leads D seconds later (hydraserve/sim/failover.py), against no failover.

    python scripts/sim_failover.py [--exec-type hydraserve] [--at 1800] [--takeovers 2,17]
                                   [--out results/sim_failover.json]

The setting: CV 8, 0.6 req/s, one hour (2,160 requests), 384 endpoints, trace seed 0 (the trace
of benchmarks/sim.py and of `ae_scripts/run_end2end_expr.py --sim`), the full-size hybrid
testbed, GPU cost model. D = 2 s is a standby's takeover (measured locally under 1 s), 17 s
the worst case of a client-go Lease (15 s lease + 2 s retry). Each D runs with the client's
retry (the default) and without it. Writes one JSON file: per run the TTFT attainment (total,
per application, in the 5 minutes from the failover), the cold starts, and for a failover what
it hit and what the standby adopted. Virtual time: the numbers are the same on any machine;
about 20 s of CPU per run (5 runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydraserve.control.lifecycle import read_lifecycle  # noqa: E402
from hydraserve.sim import failover as fo  # noqa: E402
from hydraserve.sim.costmodel import CostModel  # noqa: E402
from hydraserve.sim.run import SimSetting, simulate  # noqa: E402
from hydraserve.testbeds import testbed, with_host_caches  # noqa: E402
from hydraserve.workload.analyze import attainment, ttft_ok  # noqa: E402
from hydraserve.workload.make import make_trace  # noqa: E402

TRACE = {"cv_factor": 8, "rate": 0.6, "duration_s": 3600, "per_app": 64, "seed": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exec-type", default="hydraserve")
    ap.add_argument("--at", type=float, default=1800.0, help="T: seconds into the trace")
    ap.add_argument("--takeovers", default="2,17", help="D values, seconds (default 2,17)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "sim_failover.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the adoption's warnings: one per worker stopped
    meta, records = make_trace(**TRACE)
    setting = SimSetting(args.exec_type, with_host_caches(testbed("hybrid")),
                         CostModel.gpu_default())
    plans = [None] + [fo.Failover(args.at, float(d), retry=r)
                      for d in args.takeovers.split(",") for r in (True, False)]
    runs, baseline = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for k, plan in enumerate(plans):
            t0 = time.process_time()
            out = Path(tmp) / str(k)
            res, stats = simulate(records, dataclasses.replace(setting, failover=plan), out)
            events = read_lifecycle(out / "lifecycle.jsonl")
            if plan is None:
                baseline = (res, events)
                run = {"failover": None, "requests": len(res),
                       "failed": sum(r["error"] is not None for r in res),
                       "cold_starts": sum(e["event"] == "created" for e in events),
                       "ttft_attainment": attainment(res, ttft_ok),
                       "after_failover": fo.window(res, events, args.at,
                                                   args.at + fo.WINDOW_S)}
            else:
                rep = fo.report(plan, res, events, stats["failover"], baseline)
                run = {"failover": {"at_s": plan.at_s, "takeover_s": plan.takeover_s,
                                    "client_retry": plan.retry}, **rep}
            runs.append(run)
            label = "no failover" if plan is None else \
                f"D = {plan.takeover_s:g} s, retry {'on' if plan.retry else 'off'}"
            print(f"{label}: TTFT attainment {run['ttft_attainment']['total']:.2f}% "
                  f"({time.process_time() - t0:.1f} s of CPU)", flush=True)
    doc = {"what": "a control-plane failover in the hour-long setting, simulated "
                   "(hydraserve/sim/failover.py)",
           "command": "python scripts/sim_failover.py" + (
               "" if (args.exec_type, args.at, args.takeovers) == ("hydraserve", 1800.0, "2,17")
               else f" --exec-type {args.exec_type} --at {args.at:g} --takeovers "
                    f"{args.takeovers}"),
           "clock": "virtual time (the same numbers on any machine)",
           "exec_type": args.exec_type, "testbed": "hybrid (full size)", "cost": "gpu",
           "trace": {k: meta[k] for k in ("seed", "cv", "rate", "duration_s", "per_app",
                                          "endpoints", "n_requests")},
           "window_s": fo.WINDOW_S, "takeover_window_s": fo.TAKEOVER_WINDOW_S,
           "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
