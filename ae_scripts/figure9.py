"""Figure 9: total TTFT SLO attainment of the four execution types, ours beside the paper's.

    python ae_scripts/figure9.py [--results DIR] [--paper DIR] [--out DIR] [--json]

One panel per CV (2, 4, 8, plus any other CV we ran), x = request rate (0.6, 0.7, 0.8 req/s,
plus any other rate we ran at that CV), a group of four bars per rate: Serverless vLLM,
ServerlessLLM, HydraServe, HydraServe + cache. Each bar is the value of one setting:

  * ours, solid (source "real") or dotted (source "sim"), from
    `<results>/<exec_type>-cv<CV>-rate<RATE>/summary.json` ("real" wins over "sim" when both
    exist, then the newest summary); the paper's value is a black tick across the bar. A
    simulated setting in `<results>/sim-aggregate.json` (run with several trace seeds) is drawn
    as its mean over the seeds with min-max error bars. A real run's rate group is labelled
    with its size and scale (the committed real runs are reduced CPU runs);
  * the paper's value alone, white with coloured hatching, where we have no run (the artifact
    likewise falls back to its pre-computed results).

Writes `<out>/figure9.pdf` and `<out>/figure9.png`, prints a table (ours vs paper) and
HydraServe's attainment over each baseline's per setting (ours and the paper's), and with
`--json` prints as the last stdout line
`{"rows": [{"exec_type", "cv", "rate", "ttft_attainment", "tpot_attainment", "source",
"paper_ttft_attainment", "seeds", "ttft_min", "ttft_max", "ttft_std", "scale"}]}`, one row per
bar drawn (percent; source "real", "sim" or "paper"; tpot_attainment null when not measured;
paper_ttft_attainment null where the paper has none; with several seeds ttft_attainment and
tpot_attainment are the means, seeds their number and ttft_min/max/std the spread, else seeds
is 1 for a run of ours, 0 for the paper's value, and the spread null; scale names a real run's
size and scale, null otherwise).
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


def build_rows(runs: Mapping[e2e.Key, e2e.Run], paper: Mapping[e2e.Key, float],
               agg: Mapping[e2e.Key, Mapping[str, Any]] | None = None) -> list[Row]:
    """One row per bar: our run's value where we have one (the mean over seeds where the
    aggregate `agg` applies), else the paper's."""
    ours = {k: r for k, r in runs.items() if k[0] in e2e.EXEC_TYPES and r.ttft() is not None}
    cvs = sorted({k[1] for k in paper} | {k[1] for k in ours})
    rows: list[Row] = []
    for cv in cvs:
        rates = sorted({k[2] for k in (*paper, *ours) if k[1] == cv})
        for rate in rates:
            for et in e2e.EXEC_TYPES:
                k = e2e.key(et, cv, rate)
                pv = paper.get(k)
                if k in ours:
                    run = ours[k]
                    row = {"exec_type": et, "cv": cv, "rate": rate,
                           "ttft_attainment": run.ttft(), "tpot_attainment": run.tpot(),
                           "source": run.source, "paper_ttft_attainment": pv, "seeds": 1,
                           "ttft_min": None, "ttft_max": None, "ttft_std": None,
                           "scale": e2e.scale_label(run)}
                    entry = e2e.seed_entry(run, agg or {})
                    if entry is not None:
                        t = entry["ttft_attainment"]["total"]
                        tp = (entry.get("tpot_attainment") or {}).get("total")
                        row.update(ttft_attainment=t["mean"], seeds=len(entry["seeds"]),
                                   ttft_min=t["min"], ttft_max=t["max"], ttft_std=t["std"],
                                   tpot_attainment=tp["mean"] if tp else run.tpot())
                    rows.append(row)
                elif pv is not None:
                    rows.append({"exec_type": et, "cv": cv, "rate": rate, "ttft_attainment": pv,
                                 "tpot_attainment": None, "source": e2e.PAPER,
                                 "paper_ttft_attainment": pv, "seeds": 0, "ttft_min": None,
                                 "ttft_max": None, "ttft_std": None, "scale": None})
    return rows


def plot(rows: Sequence[Row]) -> Figure:
    """One panel per CV; groups of the four execution types per rate; paper ticks on our bars."""
    cvs = sorted({r["cv"] for r in rows}) or list(e2e.PAPER_CVS)
    fig, axes = plt.subplots(1, len(cvs), squeeze=False, sharey=True,
                             figsize=(max(5.0, 3.8 * len(cvs)), 4.4))
    slot = 0.8 / len(e2e.EXEC_TYPES)
    for ax, cv in zip(axes[0], cvs):
        rates = sorted({r["rate"] for r in rows if r["cv"] == cv})
        for r in (r for r in rows if r["cv"] == cv):
            j = e2e.EXEC_TYPES.index(r["exec_type"])
            x = rates.index(r["rate"]) - 0.4 + (j + 0.5) * slot
            color = e2e.COLORS[r["exec_type"]]
            ax.bar(x, r["ttft_attainment"], slot * 0.9, **e2e.bar_style(r["source"], color))
            if r.get("ttft_min") is not None:
                ax.errorbar(x, r["ttft_attainment"],
                            yerr=[[r["ttft_attainment"] - r["ttft_min"]],
                                  [r["ttft_max"] - r["ttft_attainment"]]],
                            fmt="none", ecolor="#333333", elinewidth=0.9, capsize=2.0, zorder=4)
            pv = r["paper_ttft_attainment"]
            if r["source"] != e2e.PAPER and pv is not None:
                ax.hlines(pv, x - slot * 0.5, x + slot * 0.5, colors="black", linewidth=2.0,
                          zorder=3)
        ticks = []
        for rt in rates:
            scales = sorted({r["scale"] for r in rows
                             if r["cv"] == cv and r["rate"] == rt and r.get("scale")})
            wrapped = [s.replace(": ", ":\n", 1).replace(", ", ",\n", 1) for s in scales]
            ticks.append("\n".join([f"{e2e.num(rt)} req/s", *wrapped]))
        ax.set_xticks(range(len(rates)), ticks, fontsize=8)
        ax.set_xlim(-0.5, max(len(rates), 1) - 0.5)
        ax.set_ylim(0, 105)
        ax.set_title(f"CV {e2e.num(cv)}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0][0].set_ylabel("TTFT SLO attainment (%)")
    fig.legend(handles=e2e.bar_legend(), loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=4,
               fontsize=8, frameon=False)
    what = e2e.ours_label(r["source"] for r in rows)
    seeds = max((r.get("seeds") or 0 for r in rows), default=0)
    if seeds > 1:
        what += f", sim: mean of {seeds} trace seeds, bars min-max"
    fig.suptitle(f"Figure 9: total TTFT SLO attainment, {what} vs paper (NSDI'26)",
                 fontsize=10 if seeds > 1 else 11, y=0.99, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.85))
    return fig


def report(rows: Sequence[Row]) -> str:
    """Ours vs the paper, one line per bar."""
    lines = []
    for r in rows:
        spread = (f"{r['ttft_min']:.1f}-{r['ttft_max']:.1f} ({r['seeds']} seeds)"
                  if r.get("ttft_min") is not None else "-")
        lines.append([e2e.num(r["cv"]), e2e.num(r["rate"]), e2e.LABELS[r["exec_type"]],
                      r["source"], *e2e.versus(r), spread, e2e.fmt(r["tpot_attainment"])])
    return e2e.table(["cv", "rate", "exec type", "source", "ours %", "paper %", "ours-paper",
                      "ours min-max", "ours TPOT %"], lines, left=4)


def ratios(rows: Sequence[Row]) -> str:
    """HydraServe over each baseline per setting (ours: the seeds' means), beside the paper's."""
    by = {(r["cv"], r["rate"], r["exec_type"]): r for r in rows}
    lines = []
    for cv, rate in sorted({(r["cv"], r["rate"]) for r in rows}):
        ours = by.get((cv, rate, "hydraserve"))
        if ours is None:
            continue
        cells = [e2e.num(cv), e2e.num(rate)]
        for base in ("serverlessllm", "serverless_vllm"):
            b = by.get((cv, rate, base))
            mine = (f"{ours['ttft_attainment'] / b['ttft_attainment']:.2f}x"
                    if b and ours["source"] != "paper" and b["source"] != "paper"
                    and b["ttft_attainment"] else "-")
            paper = (f"{ours['paper_ttft_attainment'] / b['paper_ttft_attainment']:.2f}x"
                     if b and ours.get("paper_ttft_attainment")
                     and b.get("paper_ttft_attainment") else "-")
            cells += [mine, paper]
        lines.append(cells)
    return e2e.table(["cv", "rate", "/ ServerlessLLM ours", "paper",
                      "/ Serverless vLLM ours", "paper"], lines, left=2)


def main(argv: Sequence[str] | None = None) -> int:
    args = e2e.parser(__doc__, figure="figure9").parse_args(argv)
    runs = e2e.load_runs(args.results)
    ignored = sorted({f"{r.exec_type} (cv {e2e.num(r.cv)}, rate {e2e.num(r.rate)})"
                      for r in runs.values()
                      if r.exec_type not in e2e.EXEC_TYPES or r.ttft() is None})
    if ignored:
        print(f"note: not in Figure 9 (other exec type or no TTFT attainment): "
              f"{', '.join(ignored)}")
    if not runs:
        print(f"no runs under {args.results}: plotting the paper's values only")
    rows = build_rows(runs, e2e.load_paper_fig9(args.paper), e2e.load_aggregate(args.results))
    fig = plot(rows)
    paths = e2e.save(fig, args.out, "figure9")
    plt.close(fig)
    print("Figure 9: total TTFT SLO attainment (%), ours vs paper "
          "(source 'paper': no run, the paper's value is shown; with several trace seeds "
          "'ours' is their mean)")
    for sc in sorted({f"{e2e.num(r['cv'])}/{e2e.num(r['rate'])}: {r['scale']}" for r in rows
                      if r.get("scale")}):
        print(f"real run at CV/rate {sc}")
    print(report(rows))
    print("\nHydraServe's TTFT attainment over each baseline's (ours and the paper's):")
    print(ratios(rows))
    print(f"wrote {', '.join(map(str, paths))}")
    if args.json:
        e2e.emit_json({"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
