"""`hydraserve workload replay` and `hydraserve workload analyze` (`make` lives in make.py)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("hydraserve.workload")


def add_replay_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", help="send a trace's requests to a server at their times and record each",
        description="Replay a trace (from `hydraserve workload make`) against an OpenAI-"
                    "compatible server: each request is a streamed /v1/completions call sent at "
                    "its time, with the trace's prompt length (seeded token ids) and exactly its "
                    "max_tokens (ignore_eos). Per request it records the send time, TTFT, the "
                    "time of every streamed chunk, TPOT, the HTTP status and any error; requests "
                    "that fail, time out or are never sent are recorded too. Results are JSONL, "
                    "written as requests end.")
    p.add_argument("trace", help="trace JSONL")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", required=True, help="results JSONL to write")
    p.add_argument("--concurrency", type=int, default=512,
                   help="requests open at once; later ones wait and are sent late (default 512)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before an unanswered request is recorded as failed (default 600)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="replay this many times faster than the trace's clock (default 1)")
    p.add_argument("--limit", type=int, default=None,
                   help="replay only the first N requests of the trace")
    p.add_argument("--seed", type=int, default=0, help="prompt token ids seed (default 0)")
    p.add_argument("--token-high", type=int, default=4000,
                   help="prompt token ids are drawn below this; keep it under every endpoint's "
                        "vocabulary size (default 4000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args: argparse.Namespace) -> int:
    import asyncio

    from hydraserve.workload.make import read_trace
    from hydraserve.workload.replay import ReplayConfig, replay

    meta, records = read_trace(args.trace)
    if args.limit is not None:
        records = records[:args.limit]
    if args.speed <= 0 or args.concurrency < 1:
        raise ValueError("--speed must be > 0 and --concurrency >= 1")
    cfg = ReplayConfig(url=args.url.rstrip("/"), concurrency=args.concurrency,
                       timeout_s=args.timeout, speed=args.speed, seed=args.seed,
                       token_high=args.token_high,
                       progress=not args.no_progress and sys.stderr.isatty())
    span = records[-1].time / args.speed if records else 0.0
    log.info("replaying %d requests over %.0f s against %s", len(records), span, cfg.url)
    results = asyncio.run(replay(records, cfg, args.out, {"trace": Path(args.trace).name,
                                                           "trace_meta": meta}))
    failed = sum(r["error"] is not None for r in results)
    print(f"replayed {len(results)} requests: {len(results) - failed} answered, {failed} failed; "
          f"results in {args.out}")
    return 0


def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="SLO attainment and GPU cost of a replay",
        description="TTFT (and TPOT) SLO attainment per application and in total, where a "
                    "request that failed or never answered is a violation, and the GPU cost in "
                    "GB*s per request from the gateway's lifecycle log (`serve --lifecycle-log`): "
                    "an instance is charged from its creation to 30 s after its last token, only "
                    "its all-card stage after consolidation. Writes summary.json (the format "
                    "ae_scripts/figure9/11/13.py read) and prints a table.")
    p.add_argument("results", help="replay results JSONL")
    p.add_argument("--lifecycle", default=None, help="the gateway's lifecycle log (for cost)")
    p.add_argument("--exec-type", required=True, help="the execution type the run used")
    p.add_argument("--cv", type=float, required=True, help="the trace's CV factor")
    p.add_argument("--rate", type=float, required=True, help="the trace's request rate")
    p.add_argument("--source", choices=["real", "sim"], default="real",
                   help="real (a replay against a server) or sim (the simulator)")
    p.add_argument("--tpot-slo-scale", type=float, default=None,
                   help="judge TPOT against the SLO times this factor (default: no TPOT "
                        "attainment; the paper's TPOT SLOs are GPU figures)")
    p.add_argument("--keep-alive", type=float, default=30.0,
                   help="seconds charged after an instance's last token (default 30)")
    p.add_argument("--setting", default="{}", help="JSON object stored as the run's setting")
    p.add_argument("--out", default=None, help="summary.json to write (default: print only)")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from hydraserve.control.lifecycle import read_lifecycle
    from hydraserve.workload.analyze import summarize
    from hydraserve.workload.replay import read_results

    meta, results = read_results(args.results)
    events = read_lifecycle(args.lifecycle) if args.lifecycle else None
    setting = {**json.loads(args.setting), "trace": meta.get("trace_meta", {})}
    rate = int(args.rate) if args.rate == int(args.rate) else args.rate
    cv = int(args.cv) if args.cv == int(args.cv) else args.cv
    summary = summarize(results, events, exec_type=args.exec_type, cv=cv, rate=rate,
                        source=args.source, setting=setting, tpot_slo_scale=args.tpot_slo_scale,
                        keep_alive_s=args.keep_alive)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    """A short table of one run's summary."""
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    t, p = s["ttft_attainment"], s["tpot_attainment"] or {}
    lines = [f"{s['exec_type']} cv={s['cv']} rate={s['rate']} ({s['source']}): "
             f"{s['requests']} requests, {s['answered']} answered, {s['failed']} failed",
             f"{'':16}{'TTFT %':>8}{'TPOT %':>8}"]
    for k in t:
        lines.append(f"{k:16}{fmt(t[k]):>8}{fmt(p.get(k)):>8}")
    if s.get("ttft_s"):
        q = s["ttft_s"]
        lines.append(f"TTFT p50 {q['p50']:.2f} s, p90 {q['p90']:.2f} s, p99 {q['p99']:.2f} s")
    if s.get("cost_gbs_per_request") is not None:
        lines.append(f"GPU cost {s['cost_gbs_per_request']:.1f} GB*s per request "
                     f"({s['instances']} instances)")
    for err, n in (s.get("errors") or {}).items():
        lines.append(f"  {n} x {err}")
    return "\n".join(lines)
