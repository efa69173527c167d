"""`hydraserve workload make`: the end-to-end experiment's trace, written once and replayed by
every execution type.

A trace file is JSONL. The first line is ``{"meta": {...}}`` with at least ``version`` (1),
``n_requests``, and from ``make_trace``: ``seed, cv, rate, duration_s, per_app, endpoints``
(their number), ``source`` ("azure" | "synthetic"), ``target_requests``,
``max_output_tokens``, and for a synthetic trace ``app_shares`` (the application mix it was
thinned to). Then one request per line, sorted by time (seconds from the start of the
run), with exactly these fields::

    {"time": 12.345678, "endpoint": "Llama2-13B-3", "model": "Llama2-13B",
     "application": "chatbot", "prompt_tokens": 161, "max_tokens": 338,
     "ttft_slo_s": 12.0, "tpot_slo_ms": 200.0}
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hydraserve.workload.arrivals import (compress, map_to_endpoints, regenerate, thin,
                                          thin_by_group)
from hydraserve.workload.requests import Application
from hydraserve.workload.requests import endpoints as make_endpoints
from hydraserve.workload.requests import sample_lengths, slo

VERSION = 1
DAY = 86400.0
TRACE_DAYS = 14.0  # the Azure Functions 2021 trace: two weeks

# The application mix of the paper's end-to-end trace, which the synthetic trace is thinned to
# (the real trace's mix is whatever its functions give). Derived from PAPER.md 12: at CV 8,
# 0.6 req/s each system's total attainment (Figure 9) is the share-weighted sum of its
# per-application attainments (Figure 11); the shares that fit the four systems best in the
# least-squares sense, with the shares summing to 1, are 54.86% / 34.83% / 10.30% (residuals
# under 0.04 points of attainment; README "The workload").
APP_SHARES = {"chatbot": 0.549, "code": 0.348, "summarization": 0.103}


@dataclass(frozen=True)
class TraceRecord:
    time: float  # seconds from the start of the run
    endpoint: str
    model: str
    application: str
    prompt_tokens: int
    max_tokens: int
    ttft_slo_s: float
    tpot_slo_ms: float


FIELDS = tuple(f.name for f in dataclasses.fields(TraceRecord))
_TYPES = {"time": (int, float), "endpoint": str, "model": str, "application": str,
          "prompt_tokens": int, "max_tokens": int, "ttft_slo_s": (int, float),
          "tpot_slo_ms": (int, float)}


def _window_seed(seed: int, endpoint: int) -> int:
    """Endpoint ``endpoint``'s base seed: its window k uses this + k (distinct for < 10^6
    windows and < 10^6 endpoints)."""
    return seed * 10**12 + endpoint * 10**6


def make_trace(cv_factor: float = 8, rate: float = 0.6, duration_s: float = 3600,
               per_app: int = 64, seed: int = 0, azure: str | Path | None = None,
               max_output_tokens: int | None = None,
               app_shares: dict[str, float] | None = APP_SHARES
               ) -> tuple[dict, list[TraceRecord]]:
    """The trace of one end-to-end setting, deterministic for a seed.

    1. Invocations: the Azure CSV ``azure`` or, without it, ``synthetic_invocations(seed)``;
       those in [0, 14 days) are kept (functions without one drop out, as the artifact's slice
       of the whole trace did).
    2. Functions, in order of first appearance, go to the 6 * per_app endpoints (PAPER.md 14
       order) in contiguous blocks: function i -> endpoint[n_endpoints * i // n_functions].
       The paper did this with 384 endpoints; its artifact keyed functions by ``func`` alone,
       we by (app, func).
    3. Per endpoint, per 600 s window with > 2 arrivals: a Gamma fit, CV x ``cv_factor``,
       arrivals regenerated (seeds distinct per endpoint and window).
    4. 14 days -> 1 day -> ``duration_s`` (the paper: one hour).
    5. A seeded sample of round(rate * duration_s) requests (all of them if fewer): from the
       Azure trace a uniform one (the paper's); from the synthetic trace, whose application
       mix is an accident of its function order, a uniform sample per application with
       ``app_shares`` of the requests (default ``APP_SHARES``, the paper's mix; None: uniform
       as for the Azure trace).
    6. Per request, prompt and output lengths of its application (seeded) and the SLOs of its
       application and model; ``max_output_tokens`` caps the output (for CPU runs).
    Endpoints with no arrivals simply get no requests."""
    from hydraserve.workload.azure import load_azure
    from hydraserve.workload.synthetic import synthetic_invocations

    if not (cv_factor > 0 and rate > 0 and duration_s > 0):
        raise ValueError("cv_factor, rate and duration_s must be positive")
    if per_app < 1 or seed < 0 or (max_output_tokens is not None and max_output_tokens < 1):
        raise ValueError("per_app >= 1, seed >= 0 and max_output_tokens >= 1 are required")
    span = TRACE_DAYS * DAY
    inv = load_azure(azure) if azure else synthetic_invocations(seed, days=TRACE_DAYS)
    inv = inv.between(0.0, span)
    eps = make_endpoints(per_app)
    arrivals = map_to_endpoints(inv, [e.name for e in eps])
    times, owners = [], []
    for e, ep in enumerate(eps):
        t = regenerate(arrivals[ep.name], cv_factor, _window_seed(seed, e), end=span)
        times.append(compress(t, duration_s, TRACE_DAYS))
        owners.append(np.full(len(t), e, dtype=np.int64))
    t_all, o_all = np.concatenate(times), np.concatenate(owners)
    order = np.lexsort((o_all, t_all))
    target = int(round(rate * duration_s))
    shares = None if azure else app_shares
    if shares:
        apps = [a.value for a in Application]
        unknown = set(shares) - set(apps)
        if unknown:
            raise ValueError(f"app_shares: unknown application(s) {sorted(unknown)}")
        app_of = np.array([apps.index(ep.application) for ep in eps], dtype=np.int64)
        keep = thin_by_group(order, app_of[o_all[order]],
                             [float(shares.get(a, 0.0)) for a in apps], target, seed)
    else:
        keep = thin(order, target, seed)
    rng = np.random.default_rng([seed, 1])
    records = []
    for i in keep.tolist():
        ep = eps[int(o_all[i])]
        prompt, out = sample_lengths(ep.application, rng)
        if max_output_tokens is not None:
            out = min(out, max_output_tokens)
        ttft, tpot = slo(ep.application, ep.model)
        t = math.floor(float(t_all[i]) * 1e6) / 1e6  # microseconds, never rounded up to the end
        records.append(TraceRecord(t, ep.name, ep.model, ep.application, prompt, out, ttft,
                                   tpot))
    meta = {"version": VERSION, "seed": seed, "cv": cv_factor, "rate": rate,
            "duration_s": duration_s, "per_app": per_app, "endpoints": len(eps),
            "source": "azure" if azure else "synthetic", "target_requests": target,
            "n_requests": len(records), "max_output_tokens": max_output_tokens}
    if shares:
        meta["app_shares"] = {a: float(shares.get(a, 0.0)) for a in apps}
    return meta, records


def write_trace(path: str | Path, records: list[TraceRecord], meta: dict) -> None:
    """Write a trace file: the meta line (``version`` and ``n_requests`` set here), then the
    records sorted by time."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": {**meta, "version": VERSION,
                                     "n_requests": len(records)}}) + "\n")
        for r in sorted(records, key=lambda r: r.time):
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")


def _record(obj: object) -> TraceRecord:
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in FIELDS if k not in obj]
    extra = [k for k in obj if k not in FIELDS]
    if missing or extra:
        raise ValueError(f"missing field(s) {missing}, unknown field(s) {extra}")
    for k, kind in _TYPES.items():
        if not isinstance(obj[k], kind) or isinstance(obj[k], bool):
            raise ValueError(f"field {k!r} is {obj[k]!r}")
    return TraceRecord(**obj)


def read_trace(path: str | Path) -> tuple[dict, list[TraceRecord]]:
    """(meta, records) of a trace file. A missing meta line, an unknown version, a malformed
    record or a record earlier than the one before is a ValueError naming the file and line."""
    meta: dict | None = None
    out: list[TraceRecord] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if meta is None:
                    if not (isinstance(obj, dict) and isinstance(obj.get("meta"), dict)):
                        raise ValueError('the first line must be {"meta": {...}}')
                    meta = obj["meta"]
                    if meta.get("version") != VERSION:
                        raise ValueError(f"trace version {meta.get('version')!r}, this reader "
                                         f"knows {VERSION}")
                    continue
                rec = _record(obj)
                if out and rec.time < out[-1].time:
                    raise ValueError("records are not sorted by time")
                out.append(rec)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{n}: not a trace line: {e}") from None
    if meta is None:
        raise ValueError(f"{path}: empty, not a trace file")
    return meta, out


def add_make_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``make`` on ``sub`` (wired as ``hydraserve workload make``)."""
    p = sub.add_parser(
        "make", help="make an end-to-end trace (JSONL) from the Azure Functions trace",
        description="Turn function invocations into LLM requests for model set 3 (PAPER.md "
                    "14): functions to endpoints in contiguous blocks, per 600 s window a Gamma "
                    "fit whose CV is multiplied by --cv and arrivals regenerated, 14 days -> "
                    "1 day -> --duration seconds, a seeded sample of rate x duration requests "
                    "(uniform from the Azure trace; from the synthetic one uniform per "
                    "application, to the paper's mix of 54.9 / 34.8 / 10.3 % chatbot / code / "
                    "summarization), prompt and output lengths per application (ShareGPT, HumanEval, "
                    "LongBench shapes) and the SLOs of PAPER.md 10. Without --azure a seeded "
                    "synthetic trace of the same shape is used. The defaults are the paper's.")
    p.add_argument("--out", required=True, metavar="PATH", help="trace JSONL to write")
    p.add_argument("--cv", type=float, default=8, choices=(2, 4, 8), metavar="{2,4,8}",
                   help="CV factor of the paper (default 8)")
    p.add_argument("--rate", type=float, default=0.6, help="requests per second (default 0.6)")
    p.add_argument("--duration", type=float, default=3600,
                   help="seconds the trace's day is compressed into (default 3600)")
    p.add_argument("--per-app", type=int, default=64,
                   help="endpoints per application per model (default 64: 384 endpoints)")
    p.add_argument("--seed", type=int, default=0, help="seed, >= 0 (default 0)")
    p.add_argument("--azure", default=None, metavar="CSV",
                   help="AzureFunctionsInvocationTraceForTwoWeeksJan2021 CSV (default: a "
                        "synthetic trace)")
    p.add_argument("--max-output-tokens", type=int, default=None, metavar="N",
                   help="cap every request's output length (CPU runs; default: no cap)")
    p.set_defaults(func=run_make)


def run_make(args: argparse.Namespace) -> int:
    """Make the trace of ``args``, write it, print one summary line; returns 0."""
    meta, records = make_trace(args.cv, args.rate, args.duration, args.per_app, args.seed,
                               args.azure, args.max_output_tokens)
    write_trace(args.out, records, meta)
    apps = Counter(r.application for r in records)
    used = len({r.endpoint for r in records})
    print(f"wrote {len(records)} requests for {used} of {meta['endpoints']} endpoints "
          f"({', '.join(f'{k} {apps[k]}' for k in ('chatbot', 'code', 'summarization'))}) "
          f"from a {meta['source']} trace to {args.out}")
    return 0
