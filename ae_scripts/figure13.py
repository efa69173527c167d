"""Figure 13: per-endpoint TPOT and cost, HydraServe relative to Serverless vLLM (CV 8, 0.6 req/s).

    python ae_scripts/figure13.py [--results DIR] [--paper DIR] [--out DIR] [--json]
                                  [--cv 8] [--rate 0.6]

Reads our runs `<results>/hydraserve-cv<CV>-rate<RATE>/summary.json` and
`<results>/serverless_vllm-cv<CV>-rate<RATE>/summary.json` ("real" wins over "sim" when both
exist, then the newest summary) and, for every endpoint present in both runs' `per_endpoint` with
a value in both, the ratio HydraServe / Serverless vLLM of

  (a) the mean TPOT (`tpot_ms_mean`)            -> `<out>/figure13-a.pdf`, `figure13-a.png`
  (b) GPU GB*s per request (`cost_gbs_per_request`) -> `<out>/figure13-b.pdf`, `figure13-b.png`

Each panel is the CDF of our ratios over the endpoints, with the paper's mean and median (and,
for (b), its 88% of endpoints below 1.0) drawn as reference lines and stated in the legend. The
paper publishes only these summary statistics, not per-endpoint values; when one of our two
runs is missing (or they share no endpoint with values) a panel shows the paper's statistics
alone and says so. When `<results>/sim-aggregate.json` has both simulated runs' setting with
several trace seeds (and agrees with their summaries), the CDF is still the first seed's and the
panel adds the mean over the seeds of the per-seed mean ratio with its min-max range (a shaded
band). A real run (a reduced CPU run) is named in the title with its size and scale.

Prints mean, median and fraction below 1.0, ours beside the paper's, and with `--json` prints
as the last stdout line `{"a": {...}, "b": {...}}`, each with mean, median, frac_below_1, n
(endpoints in our CDF; 0 when only the paper's values are shown), source ("real" when both runs
are real, "sim" when either is simulated, "paper" when the values are the paper's), sources (of
our two runs), ratios (endpoint -> ratio), paper (the paper's statistics) and seeds (null, or
n and the spread over the seeds -- mean, min, max, std, values -- of each of mean, median and
frac_below_1).
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import end2end_results as e2e  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

OURS, BASE = "hydraserve", "serverless_vllm"


@dataclass(frozen=True)
class Panel:
    """One sub-figure: its paper metric, the per-endpoint field it divides, and its axis label."""
    name: str
    metric: str
    field: str
    title: str
    xlabel: str


PANELS = (Panel("a", "tpot_ratio", "tpot_ms_mean", "TPOT ratio",
                "TPOT ratio (HydraServe / Serverless vLLM)"),
          Panel("b", "cost_ratio", "cost_gbs_per_request", "cost ratio",
                "GPU GB*s per request ratio (HydraServe / Serverless vLLM)"))


def _value(ep: Mapping[str, Any], field: str) -> float | None:
    v = ep.get(field)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def endpoint_ratios(ours: e2e.Run | None, base: e2e.Run | None, field: str) -> dict[str, float]:
    """Endpoint -> ours / base of `field`, for endpoints with a value in both runs (and a
    positive baseline value)."""
    if ours is None or base is None:
        return {}
    mine, theirs = ours.endpoints(), base.endpoints()
    out: dict[str, float] = {}
    for name in sorted(set(mine) & set(theirs)):
        a, b = _value(mine[name], field), _value(theirs[name], field)
        if a is not None and b is not None and b > 0:
            out[name] = a / b
    return out


def combined_source(runs: Sequence[e2e.Run]) -> str:
    """The weaker of the runs' sources: "real" only when every run is real."""
    return max((r.source for r in runs),
               key=lambda s: e2e.SOURCE_RANK.get(s, len(e2e.SOURCE_RANK)))


def panel_result(panel: Panel, ours: e2e.Run | None, base: e2e.Run | None,
                 paper: Mapping[str, float | None], where: str) -> dict[str, Any]:
    """A panel's numbers: ours where both runs share endpoints with values, else the paper's."""
    ratios = endpoint_ratios(ours, base, panel.field)
    sources = {et: r.source for et, r in ((OURS, ours), (BASE, base)) if r is not None}
    if ratios and ours is not None and base is not None:
        return {**e2e.ratio_stats(list(ratios.values())), "n": len(ratios),
                "source": combined_source([ours, base]), "sources": sources, "ratios": ratios,
                "paper": dict(paper), "note": None, "seeds": None}
    missing = [et for et, r in ((OURS, ours), (BASE, base)) if r is None]
    note = (f"no {' or '.join(missing)} run at {where}" if missing else
            f"the two runs at {where} share no endpoint with a {panel.field} value")
    return {"mean": paper.get("mean"), "median": paper.get("median"),
            "frac_below_1": paper.get("frac_below_1"), "n": 0, "source": e2e.PAPER,
            "sources": sources, "ratios": {}, "paper": dict(paper), "note": note,
            "seeds": None}


def seed_result(panel: Panel, ours: e2e.Run | None, base: e2e.Run | None,
                agg: Mapping[e2e.Key, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The spread over trace seeds of the panel's statistics, when the aggregate applies to
    both runs (see end2end_results.seed_entry) and holds Figure 13's statistics."""
    mine, theirs = e2e.seed_entry(ours, agg), e2e.seed_entry(base, agg)
    if mine is None or theirs is None or mine["seeds"] != theirs["seeds"]:
        return None
    stats = (mine.get("figure13") or {}).get(panel.metric)
    if not stats or "mean" not in stats:
        return None
    return {"n": len(mine["seeds"]), **stats}


def plot(panel: Panel, res: Mapping[str, Any], where: str) -> Figure:
    """CDF of our ratios over the endpoints with the paper's mean and median as reference lines."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    paper = res["paper"]
    ratios = sorted(res["ratios"].values())
    xs = [1.0, *ratios, *(v for v in (paper.get("mean"), paper.get("median")) if v is not None)]
    lo, hi = min(xs), max(xs)
    pad = max(0.05, 0.08 * (hi - lo))
    if ratios:
        n = len(ratios)
        ax.step([lo - pad, *ratios, hi + pad], [0.0, *((i + 1) / n for i in range(n)), 1.0],
                where="post",
                color="#c44e52", linewidth=1.8,
                label=f"ours ({res['source']}), n={n} endpoints")
        ax.axvline(res["mean"], color="#c44e52", linestyle="--", linewidth=1.0,
                   label=f"ours mean {res['mean']:.2f}")
        ax.axvline(res["median"], color="#c44e52", linestyle=":", linewidth=1.2,
                   label=f"ours median {res['median']:.2f}")
        sd = res.get("seeds")
        if sd:
            m = sd["mean"]
            ax.axvspan(m["min"], m["max"], color="#c44e52", alpha=0.15,
                       label=f"ours mean over {sd['n']} seeds {m['mean']:.2f} "
                             f"(min-max {m['min']:.2f}-{m['max']:.2f})")
            xs += [m["min"], m["max"]]
            lo, hi = min(xs), max(xs)
            pad = max(0.05, 0.08 * (hi - lo))
    else:
        ax.text(0.5, 0.5, f"{res['note']}:\nthe paper's summary statistics only\n"
                "(it publishes no per-endpoint values)", transform=ax.transAxes, ha="center",
                va="center", fontsize=8.5, bbox={"facecolor": "white", "edgecolor": "#999999"})
    if paper.get("mean") is not None:
        ax.axvline(paper["mean"], color="black", linestyle="--", linewidth=1.0,
                   label=f"paper mean {paper['mean']:.2f}")
    if paper.get("median") is not None:
        ax.axvline(paper["median"], color="black", linestyle=":", linewidth=1.2,
                   label=f"paper median {paper['median']:.2f}")
    if paper.get("frac_below_1") is not None:
        ax.plot([1.0], [paper["frac_below_1"]], marker="x", color="black", markersize=8,
                linestyle="none", label=f"paper: {paper['frac_below_1']:.0%} of endpoints < 1.0")
    ax.axvline(1.0, color="#888888", linewidth=0.6)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel("fraction of endpoints (CDF)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    what = (f"ours ({res['source']}) vs paper" if res["source"] != e2e.PAPER
            else "no CDF of ours: paper only")
    if res.get("scales"):
        what += f"; real: {'; '.join(res['scales'])}"
    ax.set_title(f"Figure 13{panel.name}: {panel.title} per endpoint, ours at {where}\n"
                 f"{what} (NSDI'26, CV 8, 0.6 req/s)", fontsize=9.5)
    fig.tight_layout()
    return fig


def report(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Mean, median, fraction below 1.0 and n, ours beside the paper's, one line per panel."""
    rows = []
    for panel in PANELS:
        r = results[panel.name]
        mine = r["source"] != e2e.PAPER
        p = r["paper"]
        sd = r.get("seeds")
        seeds = (f"{sd['mean']['mean']:.3f} ({sd['mean']['min']:.3f}-{sd['mean']['max']:.3f}, "
                 f"{sd['n']} seeds)" if sd else "-")
        rows.append([f"{panel.name} {panel.metric}", r["source"],
                     e2e.fmt(r["mean"] if mine else None, 3),
                     e2e.fmt(r["median"] if mine else None, 3),
                     e2e.fmt(r["frac_below_1"] if mine else None, 2), str(r["n"]),
                     e2e.fmt(p.get("mean"), 2), e2e.fmt(p.get("median"), 2),
                     e2e.fmt(p.get("frac_below_1"), 2), seeds])
    return e2e.table(["panel", "source", "ours mean", "ours median", "ours <1", "n",
                      "paper mean", "paper median", "paper <1", "ours mean over seeds"],
                     rows, left=2)


def main(argv: Sequence[str] | None = None) -> int:
    args = e2e.parser(__doc__, figure="figure13", setting=True).parse_args(argv)
    runs = e2e.load_runs(args.results)
    ours = runs.get(e2e.key(OURS, args.cv, args.rate))
    base = runs.get(e2e.key(BASE, args.cv, args.rate))
    paper = e2e.load_paper_fig13(args.paper)
    agg = e2e.load_aggregate(args.results)
    scales = sorted({sc for r in (ours, base) if r is not None
                     and (sc := e2e.scale_label(r)) is not None})
    where = f"CV {e2e.num(args.cv)}, {e2e.num(args.rate)} req/s"
    results: dict[str, dict[str, Any]] = {}
    written: list[Path] = []
    for panel in PANELS:
        res = panel_result(panel, ours, base, paper.get(panel.metric, {}), where)
        if res["source"] != e2e.PAPER:
            res["seeds"] = seed_result(panel, ours, base, agg)
        plot_res = {**res, "scales": scales}
        results[panel.name] = res
        if res["note"]:
            print(f"note: figure 13{panel.name}: {res['note']}: showing the paper's summary "
                  "statistics only")
        fig = plot(panel, plot_res, where)
        written += e2e.save(fig, args.out, f"figure13-{panel.name}")
        plt.close(fig)
    print(f"Figure 13: HydraServe / Serverless vLLM per endpoint, ours at {where} vs paper at "
          "CV 8, 0.6 req/s (the paper's values are approximate: 'about')")
    print(report(results))
    print(f"wrote {', '.join(map(str, written))}")
    if args.json:
        e2e.emit_json(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
