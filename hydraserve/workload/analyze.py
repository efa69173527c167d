"""SLO attainment and GPU cost of a replay (PAPER.md section 11).

- TTFT (TPOT) attainment = 1 - violations / requests, per application and in total, in percent.
  A request violates TTFT when it got no token (an error, a timeout, never sent) or its first
  token came later than its SLO; it violates TPOT when it failed or its mean time per output
  token exceeds the SLO times ``tpot_slo_scale`` (a request with one output token has no TPOT
  and meets it). ``tpot_slo_scale=None`` reports no TPOT attainment at all (CPU runs: the
  paper's TPOT SLOs are GPU figures).
- Cost = GPU-memory GB x seconds per request. From the gateway's lifecycle log
  (`hydraserve.control.lifecycle`): every stage is charged its claimed GB from its instance's
  creation until the stage is freed (consolidation, deletion), but not past ``keep_alive_s``
  after the last token its instance produced; after consolidation only the all-card stage(s)
  remain charged. An endpoint's cost per request = its instances' GB*s / its requests.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence

APPLICATIONS = ("chatbot", "code", "summarization")


def ttft_ok(r: dict) -> bool:
    return r.get("error") is None and r.get("ttft_s") is not None and \
        r["ttft_s"] <= r["ttft_slo_s"]


def tpot_ok(r: dict, scale: float) -> bool:
    if r.get("error") is not None or r.get("ttft_s") is None:
        return False
    return r.get("tpot_ms") is None or r["tpot_ms"] <= r["tpot_slo_ms"] * scale


def _percent(flags: Sequence[bool]) -> float | None:
    return round(100.0 * sum(flags) / len(flags), 3) if flags else None


def attainment(results: Sequence[dict], ok) -> dict[str, float | None]:
    """{"total": %, and one entry per application present} of ``ok(result)``."""
    out = {"total": _percent([ok(r) for r in results])}
    apps = sorted({r["application"] for r in results},
                  key=lambda a: (APPLICATIONS.index(a) if a in APPLICATIONS else 99, a))
    for app in apps:
        out[app] = _percent([ok(r) for r in results if r["application"] == app])
    return out


def instance_costs(events: Iterable[dict], keep_alive_s: float = 30.0) -> dict[str, dict]:
    """GB*s charged per instance id ({"model", "gbs"}), from lifecycle events (see module doc).
    A stage still held when the log ends (a server still running) is charged until the
    keep-alive after its instance's last token, or until the log's last event if it never
    served."""
    stages: dict[tuple[str, int], dict] = {}  # (instance created, rank) -> stage record
    owner: dict[tuple[str, int], str] = {}  # which instance serves with it now
    model: dict[str, str] = {}
    last_token: dict[str, float] = {}
    t_end = 0.0
    for e in events:
        t = float(e["t"])
        t_end = max(t_end, t)
        kind, iid = e["event"], e.get("instance")
        if kind == "created":
            model[iid] = e["model"]
            for s in e["stages"]:
                key = (iid, int(s["rank"]))
                stages[key] = {"gb": float(s["gb"]), "start": t, "end": None}
                owner[key] = iid
        elif kind == "adopted":  # a new control plane took it over: its stages go on
            model[iid] = e["model"]
            for s in e["stages"]:
                key = (s.get("created", iid), int(s.get("created_rank", s["rank"])))
                if key not in stages:  # created before the log began
                    stages[key] = {"gb": float(s["gb"]), "start": t, "end": None}
                owner[key] = iid
        elif kind == "released":  # stages a new control plane found and stopped
            for rank in e.get("ranks", ()):
                _end(stages, (iid, int(rank)), t)
        elif kind == "request_end":
            last_token[iid] = max(last_token.get(iid, t), t)
        elif kind == "consolidated":
            for rank in e.get("released", ()):
                _end(stages, (iid, int(rank)), t)
            for s in e.get("split", ()):
                owner[(iid, int(s["rank"]))] = s["instance"]
                model[s["instance"]] = model.get(iid, "")
        elif kind == "deleted":
            for key, who in owner.items():
                if who == iid:
                    _end(stages, key, t)
    out: dict[str, dict] = {}
    for key, st in stages.items():
        who = owner[key]
        end = st["end"]
        if who in last_token:  # never past the keep-alive after the last token, held or not
            end = last_token[who] + keep_alive_s if end is None else \
                min(end, last_token[who] + keep_alive_s)
        elif end is None:  # held when the log ends, never served
            end = t_end
        charged = st["gb"] * max(0.0, end - st["start"])
        rec = out.setdefault(key[0], {"model": model.get(key[0], ""), "gbs": 0.0})
        rec["gbs"] += charged
    return out


def _end(stages: dict, key: tuple[str, int], t: float) -> None:
    if key in stages and stages[key]["end"] is None:
        stages[key]["end"] = t


def summarize(results: Sequence[dict], events: Sequence[dict] | None, *, exec_type: str,
              cv: float, rate: float, source: str, setting: dict | None = None,
              tpot_slo_scale: float | None = None, keep_alive_s: float = 30.0) -> dict:
    """The run's summary.json (the format figure9/11/13.py read)."""
    per_ep: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        per_ep[r["endpoint"]].append(r)
    costs = instance_costs(events, keep_alive_s) if events is not None else None
    ep_gbs: dict[str, float] = defaultdict(float)
    for rec in (costs or {}).values():
        ep_gbs[rec["model"]] += rec["gbs"]
    endpoints = {}
    for name, rs in sorted(per_ep.items()):
        tpots = [r["tpot_ms"] for r in rs if r.get("error") is None and r.get("tpot_ms")]
        endpoints[name] = {
            "requests": len(rs), "application": rs[0]["application"], "model": rs[0]["model"],
            "tpot_ms_mean": round(statistics.mean(tpots), 4) if tpots else None,
            "cost_gbs_per_request": None if costs is None else round(ep_gbs[name] / len(rs), 3),
            "ttft_attainment": _percent([ttft_ok(r) for r in rs])}
    ttfts = sorted(r["ttft_s"] for r in results if r.get("error") is None and r.get("ttft_s"))
    failed = [r for r in results if r.get("error") is not None]
    return {
        "exec_type": exec_type, "cv": cv, "rate": rate, "source": source,
        "setting": setting or {}, "requests": len(results),
        "answered": len(results) - len(failed), "failed": len(failed),
        "errors": _top_errors(failed),
        "ttft_attainment": attainment(results, ttft_ok),
        "tpot_attainment": None if tpot_slo_scale is None else
        attainment(results, lambda r: tpot_ok(r, tpot_slo_scale)),
        "tpot_slo_scale": tpot_slo_scale,
        "ttft_s": _quantiles(ttfts),
        "cost_gbs_per_request": None if costs is None or not results else
        round(sum(c["gbs"] for c in costs.values()) / len(results), 3),
        "instances": None if costs is None else len(costs),
        "per_endpoint": endpoints,
    }


def _quantiles(xs: Sequence[float]) -> dict[str, float] | None:
    if not xs:
        return None
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"p50": round(statistics.median(xs), 4), "p90": round(q(0.9), 4),
            "p99": round(q(0.99), 4), "mean": round(statistics.mean(xs), 4)}


def _top_errors(failed: Sequence[dict], n: int = 5) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in failed:
        counts[str(r["error"])[:160]] += 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:n])
