"""Figure 11: TTFT SLO attainment per application at CV 8, 0.6 req/s, ours beside the paper's.

    python ae_scripts/figure11.py [--results DIR] [--paper DIR] [--out DIR] [--json]
                                  [--cv 8] [--rate 0.6]

A group of four bars (Serverless vLLM, ServerlessLLM, HydraServe, HydraServe + cache) per
application (chatbot, code, summarization). Each bar is ours where we have a run,
`<results>/<exec_type>-cv<CV>-rate<RATE>/summary.json` ("real" solid, "sim" dotted; "real" wins
over "sim" when both exist, then the newest summary), with the paper's value as a black tick
across it; where we have no run (or the run has no value for that application) the paper's value
alone is drawn, white with coloured hatching. The paper's values are at CV 8, 0.6 req/s; --cv and
--rate pick another setting of ours to compare against them (the title then says so). A
simulated setting in `<results>/sim-aggregate.json` (several trace seeds) is drawn as its mean
over the seeds with min-max error bars; a real run (a reduced CPU run) is named in the title
with its size and scale.

Writes `<out>/figure11.pdf` and `<out>/figure11.png`, prints a table (ours vs paper), and with
`--json` prints as the last stdout line `{"rows": [{"exec_type", "application",
"ttft_attainment", "source", "paper_ttft_attainment", "cv", "rate", "seeds", "ttft_min",
"ttft_max", "ttft_std", "scale"}]}`, one row per bar drawn (percent; source "real", "sim" or
"paper"; cv and rate of the value shown; seeds, the spread and scale as in figure9.py).
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import end2end_results as e2e  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

Row = dict[str, Any]


def build_rows(runs: Mapping[e2e.Key, e2e.Run], paper: Mapping[tuple[str, str], float],
               cv: float, rate: float,
               agg: Mapping[e2e.Key, Mapping[str, Any]] | None = None) -> list[Row]:
    """One row per bar: our run's attainment for the application at (cv, rate) (the mean over
    seeds where the aggregate `agg` applies), else the paper's value (at CV 8, 0.6 req/s)."""
    rows: list[Row] = []
    for app in e2e.APPLICATIONS:
        for et in e2e.EXEC_TYPES:
            run = runs.get(e2e.key(et, cv, rate))
            ours = run.ttft(app) if run is not None else None
            pv = paper.get((et, app))
            if run is not None and ours is not None:
                row = {"exec_type": et, "application": app, "ttft_attainment": ours,
                       "source": run.source, "paper_ttft_attainment": pv,
                       "cv": run.cv, "rate": run.rate, "seeds": 1, "ttft_min": None,
                       "ttft_max": None, "ttft_std": None, "scale": e2e.scale_label(run)}
                sp = e2e.seed_spread(run, agg or {}, app)
                if sp is not None:
                    row.update(ttft_attainment=sp["mean"], ttft_min=sp["min"],
                               ttft_max=sp["max"], ttft_std=sp["std"],
                               seeds=len(e2e.seed_entry(run, agg or {})["seeds"]))
                rows.append(row)
            elif pv is not None:
                rows.append({"exec_type": et, "application": app, "ttft_attainment": pv,
                             "source": e2e.PAPER, "paper_ttft_attainment": pv,
                             "cv": e2e.FIG11_CV, "rate": e2e.FIG11_RATE, "seeds": 0,
                             "ttft_min": None, "ttft_max": None, "ttft_std": None,
                             "scale": None})
    return rows


def plot(rows: Sequence[Row], cv: float, rate: float) -> Figure:
    """Groups of the four execution types per application; paper ticks on our bars."""
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    slot = 0.8 / len(e2e.EXEC_TYPES)
    for r in rows:
        j = e2e.EXEC_TYPES.index(r["exec_type"])
        x = e2e.APPLICATIONS.index(r["application"]) - 0.4 + (j + 0.5) * slot
        ax.bar(x, r["ttft_attainment"], slot * 0.9,
               **e2e.bar_style(r["source"], e2e.COLORS[r["exec_type"]]))
        if r.get("ttft_min") is not None:
            ax.errorbar(x, r["ttft_attainment"],
                        yerr=[[r["ttft_attainment"] - r["ttft_min"]],
                              [r["ttft_max"] - r["ttft_attainment"]]],
                        fmt="none", ecolor="#333333", elinewidth=0.9, capsize=2.0, zorder=4)
        pv = r["paper_ttft_attainment"]
        if r["source"] != e2e.PAPER and pv is not None:
            ax.hlines(pv, x - slot * 0.5, x + slot * 0.5, colors="black", linewidth=2.0,
                      zorder=3)
    ax.set_xticks(range(len(e2e.APPLICATIONS)), list(e2e.APPLICATIONS))
    ax.set_xlim(-0.5, len(e2e.APPLICATIONS) - 0.5)
    ax.set_ylim(0, 105)
    ax.set_ylabel("TTFT SLO attainment (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(handles=e2e.bar_legend(), loc="upper center", bbox_to_anchor=(0.5, 0.91), ncol=4,
               fontsize=7.5, frameon=False)
    where = "CV 8, 0.6 req/s"
    if (round(cv, 6), round(rate, 6)) != (e2e.FIG11_CV, e2e.FIG11_RATE):
        where = f"ours at CV {e2e.num(cv)}, {e2e.num(rate)} req/s; paper at CV 8, 0.6 req/s"
    what = e2e.ours_label(r["source"] for r in rows)
    seeds = max((r.get("seeds") or 0 for r in rows), default=0)
    if seeds > 1:
        what += f", sim: mean of {seeds} trace seeds, bars min-max"
    scales = sorted({r["scale"] for r in rows if r.get("scale")})
    if scales:
        what += "; real: " + "; ".join(s.removeprefix("CPU run: ") + " CPU run"
                                         for s in scales)
    fig.suptitle(f"Figure 11: TTFT SLO attainment per application ({where})\n"
                 f"{what} vs paper (NSDI'26)", fontsize=9 if seeds > 1 or scales else 10,
                 y=0.99, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.87))
    return fig


def report(rows: Sequence[Row]) -> str:
    """Ours vs the paper, one line per bar."""
    lines = []
    for r in rows:
        spread = (f"{r['ttft_min']:.1f}-{r['ttft_max']:.1f} ({r['seeds']} seeds)"
                  if r.get("ttft_min") is not None else "-")
        lines.append([r["application"], e2e.LABELS[r["exec_type"]], r["source"],
                      *e2e.versus(r), spread])
    return e2e.table(["application", "exec type", "source", "ours %", "paper %", "ours-paper",
                      "ours min-max"], lines, left=3)


def main(argv: Sequence[str] | None = None) -> int:
    args = e2e.parser(__doc__, figure="figure11", setting=True).parse_args(argv)
    runs = e2e.load_runs(args.results)
    mine = [et for et in e2e.EXEC_TYPES if e2e.key(et, args.cv, args.rate) in runs]
    if not mine:
        print(f"no runs at CV {e2e.num(args.cv)}, {e2e.num(args.rate)} req/s under "
              f"{args.results}: plotting the paper's values only")
    rows = build_rows(runs, e2e.load_paper_fig11(args.paper), args.cv, args.rate,
                      e2e.load_aggregate(args.results))
    fig = plot(rows, args.cv, args.rate)
    paths = e2e.save(fig, args.out, "figure11")
    plt.close(fig)
    print(f"Figure 11: TTFT SLO attainment (%) per application, ours at CV {e2e.num(args.cv)}, "
          f"{e2e.num(args.rate)} req/s vs paper at CV 8, 0.6 req/s "
          "(source 'paper': no run, the paper's value is shown)")
    print(report(rows))
    print(f"wrote {', '.join(map(str, paths))}")
    if args.json:
        e2e.emit_json({"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
