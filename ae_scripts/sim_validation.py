"""How far to trust the simulator: its results beside the measurements they should match.

    python ae_scripts/sim_validation.py [--out results/sim-validation.md]

(a) the reduced real end-to-end run (results/end2end/*-cv*-rate*/ with source "real") against
    the same trace simulated on the scaled hybrid testbed with the local-CPU cost model
    (`hydraserve sim --cost local-cpu`): TTFT attainment per application and median TTFT;
(b) our real Figure 7 on the scaled testbeds (results/figure7/) against the simulated one
    (results/figure7-simlocal/, `run_figure7_expr.py --sim --sim-local`): error per bar;
(c) Figure 7 at the paper's scale (results/figure7-sim/, `run_figure7_expr.py --sim`) against
    the paper's bars (results/paper/figure7.csv): error per bar. Reported, not tuned.
Prints the tables (markdown) and writes them to --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _csv(path: Path) -> dict[tuple[str, str, str], float]:
    if not path.exists():
        return {}
    with open(path) as f:
        return {(r["backend"], r["exec_type"], r["model"]): float(r["ttft_s"])
                for r in csv.DictReader(f) if r.get("ttft_s")}


def bar_table(ours: dict, ref: dict, ref_name: str, ours_name: str) -> list[str]:
    rows = [f"| testbed | exec type | model | {ref_name} (s) | {ours_name} (s) | error |",
            "|---|---|---|---|---|---|"]
    errs = []
    for key in sorted(ours):
        if key in ref:
            err = (ours[key] - ref[key]) / ref[key] * 100
            errs.append(abs(err))
            rows.append(f"| {key[0]} | {key[1]} | {key[2]} | {ref[key]:.2f} | {ours[key]:.2f} | "
                        f"{err:+.1f}% |")
    if errs:
        rows.append(f"\nmedian |error| {statistics.median(errs):.1f}% over {len(errs)} bars; "
                    f"max {max(errs):.1f}%")
    return rows


def e2e_table(results: Path) -> list[str]:
    rows = ["| exec type | application | real TTFT % | sim TTFT % | points | real p50 TTFT (s) "
            "| sim p50 TTFT (s) | error |", "|---|---|---|---|---|---|---|---|"]
    for summary in sorted(results.glob("*-cv*-rate*/summary.json")):
        real = json.loads(summary.read_text())
        if real.get("source") != "real":
            continue
        with tempfile.TemporaryDirectory() as tmp:
            trace = summary.parent / "trace.jsonl"
            subprocess.run([sys.executable, "-m", "hydraserve.cli", "sim", str(trace),
                            "--exec-type", real["exec_type"], "--cost", "local-cpu",
                            "--out", tmp], check=True, capture_output=True)
            sim = json.loads((Path(tmp) / "summary.json").read_text())
        rq, sq = (real.get("ttft_s") or {}).get("p50"), (sim.get("ttft_s") or {}).get("p50")
        for app, value in real["ttft_attainment"].items():
            s = sim["ttft_attainment"].get(app)
            med = f"| {rq:.2f} | {sq:.2f} | {(sq - rq) / rq * 100:+.0f}% |" if app == "total" \
                and rq and sq else "| | | |"
            rows.append(f"| {real['exec_type']} | {app} | {value:.1f} | "
                        f"{'-' if s is None else f'{s:.1f}'} | "
                        f"{'-' if s is None else f'{s - value:+.1f}'} {med}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results" / "sim-validation.md"))
    args = ap.parse_args()
    res = ROOT / "results"
    paper = {k: v for k, v in _csv(res / "paper" / "figure7.csv").items()}
    real7 = {}
    for b in ("a10", "v100"):
        real7.update(_csv(res / "figure7" / f"{b}.csv"))
    local7, sim7 = {}, {}
    for b in ("a10", "v100"):
        local7.update(_csv(res / "figure7-simlocal" / f"{b}.csv"))
        sim7.update(_csv(res / "figure7-sim" / f"{b}.csv"))
    lines = ["# The simulator against measurements", "",
             "## (a) The reduced real end-to-end run, simulated (scaled hybrid testbed, "
             "local-CPU cost model)", "", *e2e_table(res / "end2end"), "",
             "## (b) Our real Figure 7 (scaled testbeds), simulated with the local-CPU cost "
             "model", "", *bar_table(local7, real7, "real", "sim"), "",
             "## (c) Figure 7 at the paper's scale, simulated with the GPU cost model, against "
             "the paper", "", *bar_table(sim7, paper, "paper", "sim")]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
