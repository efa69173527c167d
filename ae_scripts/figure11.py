"""Figure 11: TTFT SLO attainment per application at CV 8, 0.6 req/s, ours beside the paper's.

    python ae_scripts/figure11.py [--results DIR] [--paper DIR] [--out DIR] [--json]
                                  [--cv 8] [--rate 0.6]

A group of four bars (Serverless vLLM, ServerlessLLM, HydraServe, HydraServe + cache) per
application (chatbot, code, summarization). Each bar is ours where we have a run,
`<results>/<exec_type>-cv<CV>-rate<RATE>/summary.json` ("real" solid, "sim" dotted; "real" wins
over "sim" when both exist, then the newest summary), with the paper's value as a black tick
across it; where we have no run (or the run has no value for that application) the paper's value
alone is drawn, white with coloured hatching. The paper's values are at CV 8, 0.6 req/s; --cv and
--rate pick another setting of ours to compare against them (the title then says so).

Writes `<out>/figure11.pdf` and `<out>/figure11.png`, prints a table (ours vs paper), and with
`--json` prints as the last stdout line `{"rows": [{"exec_type", "application",
"ttft_attainment", "source", "paper_ttft_attainment", "cv", "rate"}]}`, one row per bar drawn
(percent; source "real", "sim" or "paper"; cv and rate of the value shown).
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
               cv: float, rate: float) -> list[Row]:
    """One row per bar: our run's attainment for the application at (cv, rate), else the
    paper's value (at CV 8, 0.6 req/s)."""
    rows: list[Row] = []
    for app in e2e.APPLICATIONS:
        for et in e2e.EXEC_TYPES:
            run = runs.get(e2e.key(et, cv, rate))
            ours = run.ttft(app) if run is not None else None
            pv = paper.get((et, app))
            if run is not None and ours is not None:
                rows.append({"exec_type": et, "application": app, "ttft_attainment": ours,
                             "source": run.source, "paper_ttft_attainment": pv,
                             "cv": run.cv, "rate": run.rate})
            elif pv is not None:
                rows.append({"exec_type": et, "application": app, "ttft_attainment": pv,
                             "source": e2e.PAPER, "paper_ttft_attainment": pv,
                             "cv": e2e.FIG11_CV, "rate": e2e.FIG11_RATE})
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
    fig.suptitle(f"Figure 11: TTFT SLO attainment per application ({where})\n"
                 f"{e2e.ours_label(r['source'] for r in rows)} vs paper (NSDI'26)",
                 fontsize=10, y=0.99, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.87))
    return fig


def report(rows: Sequence[Row]) -> str:
    """Ours vs the paper, one line per bar."""
    lines = []
    for r in rows:
        lines.append([r["application"], e2e.LABELS[r["exec_type"]], r["source"],
                      *e2e.versus(r)])
    return e2e.table(["application", "exec type", "source", "ours %", "paper %", "ours-paper"],
                     lines, left=3)


def main(argv: Sequence[str] | None = None) -> int:
    args = e2e.parser(__doc__, figure="figure11", setting=True).parse_args(argv)
    runs = e2e.load_runs(args.results)
    mine = [et for et in e2e.EXEC_TYPES if e2e.key(et, args.cv, args.rate) in runs]
    if not mine:
        print(f"no runs at CV {e2e.num(args.cv)}, {e2e.num(args.rate)} req/s under "
              f"{args.results}: plotting the paper's values only")
    rows = build_rows(runs, e2e.load_paper_fig11(args.paper), args.cv, args.rate)
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
