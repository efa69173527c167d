"""`hydraserve sim`: a trace through the real control plane on a simulated cluster."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

COSTS = ("gpu", "local-cpu")


def add_sim_parser(sub: argparse._SubParsersAction) -> None:
    from hydraserve.control.presets import ExecType
    from hydraserve.testbeds import TESTBEDS

    p = sub.add_parser(
        "sim", help="simulate a trace on a cluster in virtual time (the paper's scale in seconds)",
        description="Replay a trace (`hydraserve workload make`) through HydraServe's own "
                    "controller, placement and NIC admission on a simulated cluster, in virtual "
                    "time: workers are timed by a cost model (hydraserve/sim/costmodel.py: "
                    "start-up, fetch over NICs shared fairly and the store's egress, PCIe copy, "
                    "prefill and decode from the GPU's roofline). Writes replay.jsonl and "
                    "lifecycle.jsonl like a real run, and summary.json (source \"sim\").")
    p.add_argument("trace", help="trace JSONL")
    p.add_argument("--exec-type", default="hydraserve", choices=[e.value for e in ExecType],
                   help="execution type (default: hydraserve)")
    p.add_argument("--testbed", default="hybrid", choices=TESTBEDS,
                   help="the paper's testbed, at full scale (default: hybrid, the end-to-end one)")
    p.add_argument("--cost", default="gpu", choices=COSTS,
                   help="cost model: gpu (the paper's servers) or local-cpu (our local "
                        "cluster's workers on a 2-core machine, for checking against real runs)")
    p.add_argument("--static-p", type=int, default=None, metavar="P",
                   help="place every cold start as static(P)")
    p.add_argument("--keep-alive", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--tpot-slo-scale", type=float, default=1.0,
                   help="judge TPOT against the SLO times this (default 1: GPU figures)")
    p.add_argument("--out", required=True, help="folder for replay.jsonl, lifecycle.jsonl, "
                                                "summary.json")
    p.add_argument("--failover-at", type=float, default=None, metavar="S",
                   help="the control plane dies (as on SIGKILL) S seconds into the trace and a "
                        "standby leads --takeover-s later, adopting the running instances "
                        "(hydraserve/sim/failover.py); the trace is also simulated without it "
                        "(into OUT/without-failover/) and summary.json's \"failover\" compares "
                        "the two")
    p.add_argument("--takeover-s", type=float, default=2.0, metavar="D",
                   help="with --failover-at: seconds without a leader (default 2)")
    p.add_argument("--no-client-retry", action="store_true",
                   help="with --failover-at: a request whose connection broke or was refused "
                        "fails (default: the client sends it again to the new leader)")
    p.set_defaults(func=_cmd_sim)


def _cmd_sim(args: argparse.Namespace) -> int:
    control = logging.getLogger("hydraserve.control")
    level = control.level
    if logging.getLogger().getEffectiveLevel() >= logging.INFO:
        # a simulated hour starts ~1,500 instances: their one-line stories are noise here
        control.setLevel(logging.WARNING)
    try:
        return _simulate(args)
    finally:
        control.setLevel(level)  # a caller in this process (cli.main in a test) keeps its own


def _simulate(args: argparse.Namespace) -> int:
    from hydraserve.control.lifecycle import read_lifecycle
    from hydraserve.sim import failover as fo
    from hydraserve.sim.costmodel import CostModel
    from hydraserve.sim.run import SimSetting, simulate
    from hydraserve.testbeds import testbed, with_host_caches
    from hydraserve.workload.analyze import summarize
    from hydraserve.workload.commands import format_summary
    from hydraserve.workload.make import read_trace

    meta, records = read_trace(args.trace)
    cost = CostModel.gpu_default() if args.cost == "gpu" else CostModel.local_cpu()
    setting = SimSetting(args.exec_type, with_host_caches(testbed(args.testbed)), cost,
                         keep_alive_s=args.keep_alive, static_p=args.static_p,
                         device="cpu" if args.cost == "local-cpu" else None)
    out = Path(args.out)
    failover = None if args.failover_at is None else \
        fo.Failover(args.failover_at, args.takeover_s, retry=not args.no_client_retry)
    where = {"trace": Path(args.trace).name, "trace_meta": meta}
    baseline = None
    if failover is not None:  # the same trace without the failover, to compare with
        b_results, _ = simulate(records, setting, out / "without-failover", where)
        baseline = (b_results, read_lifecycle(out / "without-failover" / "lifecycle.jsonl"))
        setting = dataclasses.replace(setting, failover=failover)
    results, stats = simulate(records, setting, out, where)
    events = read_lifecycle(out / "lifecycle.jsonl")
    summary = summarize(results, events, exec_type=args.exec_type, cv=meta.get("cv"),
                        rate=meta.get("rate"), source="sim" if failover is None else
                        "sim-failover", tpot_slo_scale=args.tpot_slo_scale,
                        keep_alive_s=args.keep_alive,
                        setting={"testbed": args.testbed, "cost": args.cost,
                                 "static_p": args.static_p, "keep_alive_s": args.keep_alive,
                                 "trace": meta, "wall_s": stats["wall_s"]})
    if failover is not None:
        summary["failover"] = fo.report(failover, results, events, stats["failover"], baseline)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary))
    if failover is not None:
        print(fo.format_report(summary["failover"]))
    print(f"simulated {stats['requests']} requests in {stats['wall_s']:.1f} s of wall time")
    return 0
