"""`hydraserve workload make`: the end-to-end experiment's trace, written once and replayed by
every execution type (and by the simulator).

A trace file is JSONL: a first line ``{"meta": {...}}`` (version, seed, cv, rate, duration_s,
per_app, endpoints, source "azure" | "synthetic", requests), then one request per line, sorted
by time (seconds from the start of the run)::

    {"time", "endpoint", "model", "application", "prompt_tokens", "max_tokens",
     "ttft_slo_s", "tpot_slo_ms"}
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hydraserve.workload.arrivals import compress, map_to_endpoints, regenerate, thin
from hydraserve.workload.requests import endpoints as make_endpoints
from hydraserve.workload.requests import sample_lengths, slo

VERSION = 1


@dataclass(frozen=True)
class TraceRecord:
    time: float
    endpoint: str
    model: str
    application: str
    prompt_tokens: int
    max_tokens: int
    ttft_slo_s: float
    tpot_slo_ms: float


def make_trace(cv_factor: float = 8, rate: float = 0.6, duration_s: float = 3600,
               per_app: int = 64, seed: int = 0, azure: str | None = None,
               max_output_tokens: int | None = None) -> tuple[dict, list[TraceRecord]]:
    """Invocations (the Azure file, or synthetic) -> endpoints in contiguous blocks -> per
    600 s window a Gamma fit with its CV x ``cv_factor``, arrivals regenerated -> 14 days into
    one day into ``duration_s`` -> a uniform sample of round(rate * duration_s) requests ->
    lengths and SLOs per application. Deterministic for a seed."""
    from hydraserve.workload.azure import load_azure
    from hydraserve.workload.synthetic import synthetic_invocations

    inv = load_azure(azure) if azure else synthetic_invocations(seed)
    eps = make_endpoints(per_app)
    arrivals = map_to_endpoints(inv, [e.name for e in eps])
    times, owners = [], []
    for e, ep in enumerate(eps):
        t = regenerate(arrivals[ep.name], cv_factor, seed=seed * 1_000_003 + e * 10_007)
        t = compress(t, duration_s)
        times.append(t)
        owners.append(np.full(len(t), e, dtype=np.int64))
    t_all = np.concatenate(times) if times else np.empty(0)
    o_all = np.concatenate(owners) if owners else np.empty(0, dtype=np.int64)
    order = np.argsort(t_all, kind="stable")
    t_all, o_all = t_all[order], o_all[order]
    keep = thin(len(t_all), int(round(rate * duration_s)), seed)
    rng = np.random.default_rng(seed + 7)
    records = []
    for i in keep:
        ep = eps[int(o_all[i])]
        prompt, out = sample_lengths(ep.application, rng)
        if max_output_tokens:
            out = min(out, max_output_tokens)
        ttft, tpot = slo(ep.application, ep.model)
        records.append(TraceRecord(round(float(t_all[i]), 6), ep.name, ep.model,
                                   ep.application, prompt, out, ttft, tpot))
    meta = {"version": VERSION, "seed": seed, "cv": cv_factor, "rate": rate,
            "duration_s": duration_s, "per_app": per_app, "endpoints": len(eps),
            "source": "azure" if azure else "synthetic", "requests": len(records),
            "max_output_tokens": max_output_tokens}
    return meta, records


def write_trace(path: str | Path, records: list[TraceRecord], meta: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": {"version": VERSION, **meta,
                                     "requests": len(records)}}) + "\n")
        for r in sorted(records, key=lambda r: r.time):
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")


def read_trace(path: str | Path) -> tuple[dict, list[TraceRecord]]:
    """(meta, records) of a trace file; a malformed line is a ValueError naming it."""
    fields = [f.name for f in dataclasses.fields(TraceRecord)]
    meta: dict = {}
    out = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if n == 1 and "meta" in obj:
                meta = obj["meta"]
                continue
            out.append(TraceRecord(**{k: obj[k] for k in fields}))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a trace record ({e!r})") from None
    return meta, out


def add_make_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make", help="make an end-to-end trace (JSONL) from the Azure Functions trace",
        description="Turn function invocations into LLM requests for model set 3 (PAPER.md "
                    "14): functions to endpoints in contiguous blocks, per 600 s window a Gamma "
                    "fit whose CV is multiplied by --cv and arrivals regenerated, 14 days -> "
                    "1 day -> --duration, a uniform sample of rate x duration requests, prompt "
                    "and output lengths per application (ShareGPT, HumanEval, LongBench "
                    "shapes) and the SLO table. Without --azure a synthetic trace of the same "
                    "shape is used. The defaults are the paper's.")
    p.add_argument("--out", required=True, help="trace JSONL to write")
    p.add_argument("--cv", type=float, default=8, help="CV factor (paper: 2, 4, 8; default 8)")
    p.add_argument("--rate", type=float, default=0.6, help="requests per second (default 0.6)")
    p.add_argument("--duration", type=float, default=3600,
                   help="seconds one day is compressed into (default 3600)")
    p.add_argument("--per-app", type=int, default=64,
                   help="endpoints per application per model (default 64: 384 endpoints)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--azure", default=None,
                   help="AzureFunctionsInvocationTraceForTwoWeeksJan2021 CSV (default: synthetic)")
    p.add_argument("--max-output-tokens", type=int, default=None,
                   help="cap every request's output length (CPU runs; default: none)")
    p.set_defaults(func=_cmd_make)


def _cmd_make(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.duration <= 0 or args.cv <= 0:
        raise ValueError("--rate, --duration and --cv must be positive")
    meta, records = make_trace(args.cv, args.rate, args.duration, args.per_app, args.seed,
                               args.azure, args.max_output_tokens)
    write_trace(args.out, records, meta)
    apps = Counter(r.application for r in records)
    used = len({r.endpoint for r in records})
    print(f"wrote {len(records)} requests for {used} of {meta['endpoints']} endpoints "
          f"({', '.join(f'{k} {v}' for k, v in sorted(apps.items()))}) from a "
          f"{meta['source']} trace to {args.out}")
    return 0
