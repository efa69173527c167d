"""Figure 7: cold-start TTFT per model and execution type, ours beside the paper's.

    python ae_scripts/figure7.py [--results DIR] [--paper FILE] [--out DIR] [--backends a10,v100]

Reads our measurements `<results>/<backend>.csv` (default `results/figure7/` under the repo root),
one row per (exec_type, model, backend) with the header

    exec_type,model,backend,ttft_s,tpot_ms,trials,queue_s,fetch_s,load_s,init_s,first_token_s

(`trials` is a `;`-separated list of the trial TTFTs in seconds; the breakdown columns are seconds;
an empty cell is a missing value), and the paper's values from `results/paper/figure7.csv`.

Writes `<out>/figure7.pdf` (page 1: grouped bars, one subplot row per backend, ours solid and the
paper's hatched beside each; page 2: a stacked breakdown of each of our cold starts),
`<out>/figure7.png` (page 1) and `<out>/figure7-breakdown.png` (page 2), and prints a table of
the HydraServe speed-ups over Serverless vLLM (and over the real vLLM when measured). A missing
results file or row is fine: where we have no measurement only the paper's bar is drawn.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The paper's five columns, in its order; `vllm` is the real vLLM peer (ours only).
EXEC_TYPES = ("serverless_vllm", "serverlessllm", "serverlessllm_with_cached_model",
              "hydraserve_with_single_worker", "hydraserve")
VLLM = "vllm"
MODELS = ("OPT-2.7B", "OPT-6.7B", "OPT-13B", "Llama2-7B", "Llama2-13B", "Llama3-8B", "Falcon-7B")
BACKENDS = ("a10", "v100")
BREAKDOWN = ("queue_s", "fetch_s", "load_s", "init_s", "first_token_s")
OURS_HEADER = ("exec_type", "model", "backend", "ttft_s", "tpot_ms", "trials", *BREAKDOWN)

LABELS = {"serverless_vllm": "Serverless vLLM", "serverlessllm": "ServerlessLLM",
          "serverlessllm_with_cached_model": "ServerlessLLM (cached)",
          "hydraserve_with_single_worker": "HydraServe (single worker)",
          "hydraserve": "HydraServe", VLLM: "vLLM (real)"}
SHORT = {"serverless_vllm": "SvLLM", "serverlessllm": "SLLM",
         "serverlessllm_with_cached_model": "SLLM-c", "hydraserve_with_single_worker": "HS-1w",
         "hydraserve": "HS", VLLM: "vLLM"}
COLORS = {"serverless_vllm": "#4c72b0", "serverlessllm": "#dd8452",
          "serverlessllm_with_cached_model": "#937860", "hydraserve_with_single_worker": "#8172b3",
          "hydraserve": "#c44e52", VLLM: "#55a868"}
# rows measured with the warm runtime pool (run_figure7_expr.py --warm-runtime): a platform
# feature, not the paper's, shown beside the paper-faithful rows
WARM = "+warm"
for _et, _color in (("serverless_vllm", "#8fa9d6"), ("serverlessllm", "#eeb58f"),
                    ("hydraserve", "#e08a8c")):
    LABELS[_et + WARM] = LABELS[_et] + " + warm runtime"
    SHORT[_et + WARM] = SHORT[_et] + "+w"
    COLORS[_et + WARM] = _color
STAGE_COLORS = {"queue_s": "#bab0ac", "fetch_s": "#4c72b0", "load_s": "#dd8452",
                "init_s": "#8172b3", "first_token_s": "#55a868"}

Key = tuple[str, str, str]  # (exec_type, model, backend)


@dataclass(frozen=True)
class Measurement:
    """One row of our results: TTFT (s), TPOT (ms), the trial TTFTs and the stage times (s)."""
    ttft_s: float | None
    tpot_ms: float | None = None
    trials: tuple[float, ...] = ()
    breakdown: dict[str, float] = field(default_factory=dict)  # only the stages measured


def _num(cell: str | None) -> float | None:
    cell = (cell or "").strip()
    return float(cell) if cell else None


def ttft_from_trials(trials: Sequence[float]) -> float | None:
    """The paper's cold-start TTFT: the mean of the two smallest trials (or the only one)."""
    best = sorted(trials)[:2]
    return sum(best) / len(best) if best else None


def load_paper(path: Path) -> dict[Key, float]:
    """The paper's Figure 7 values: (exec_type, model, backend) -> TTFT in seconds."""
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {(r["exec_type"], r["model"], r["backend"]): float(r["ttft_s"])
                for r in csv.DictReader(f) if (r.get("ttft_s") or "").strip()}


def load_ours(results: Path, backends: Sequence[str]) -> dict[Key, Measurement]:
    """Our measurements from `<results>/<backend>.csv`; a missing file contributes nothing.

    A row whose `ttft_s` is empty takes the TTFT from its trials (mean of the two smallest)."""
    out: dict[Key, Measurement] = {}
    for backend in backends:
        path = results / f"{backend}.csv"
        if not path.exists():
            continue
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in OURS_HEADER if c not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"{path}: missing columns {missing}; expected {OURS_HEADER}")
            for r in reader:
                if not (r["exec_type"] or "").strip():
                    continue
                trials = tuple(float(t) for t in (r["trials"] or "").split(";") if t.strip())
                ttft = _num(r["ttft_s"])
                breakdown = {s: v for s in BREAKDOWN if (v := _num(r[s])) is not None}
                key = (r["exec_type"].strip(), r["model"].strip(),
                       (r["backend"] or "").strip() or backend)
                out[key] = Measurement(ttft if ttft is not None else ttft_from_trials(trials),
                                       _num(r["tpot_ms"]), trials, breakdown)
    return out


def exec_types_shown(ours: Mapping[Key, object]) -> list[str]:
    """The paper's five types, then any other type we measured, then the vLLM peer if measured."""
    seen = {k[0] for k in ours}
    extra = sorted(seen - set(EXEC_TYPES) - {VLLM})
    return [*EXEC_TYPES, *extra, *([VLLM] if VLLM in seen else [])]


def models_shown(backend: str, *tables: Mapping[Key, object]) -> list[str]:
    """Models with any value on this backend: the paper's order first, then others by name."""
    present = {k[1] for t in tables for k in t if k[2] == backend}
    return [m for m in MODELS if m in present] + sorted(present - set(MODELS))


def plot_bars(ours: Mapping[Key, float], paper: Mapping[Key, float], backends: Sequence[str],
              trials: Mapping[Key, Sequence[float]] | None = None) -> Figure:
    """Grouped bars, one subplot row per backend: for each model a group of execution types,
    ours solid with its trials as dots, the paper's value hatched and lighter just right of it."""
    types = exec_types_shown(ours)
    widest = max([len(models_shown(b, ours, paper)) for b in backends] + [1])
    fig, axes = plt.subplots(len(backends), 1, squeeze=False,
                             figsize=(max(8.0, 1.6 * widest * len(types) / 5), 3.4 * len(backends)))
    slot = 0.84 / len(types)
    half = slot / 2
    for ax, backend in zip(axes[:, 0], backends):
        models = models_shown(backend, ours, paper)
        for j, et in enumerate(types):
            for i, model in enumerate(models):
                key = (et, model, backend)
                left = i - 0.42 + j * slot
                if key in ours:
                    ax.bar(left + half / 2, ours[key], half, color=COLORS.get(et, "#777777"),
                           edgecolor="black", linewidth=0.4)
                    pts = (trials or {}).get(key, ())
                    ax.scatter([left + half / 2] * len(pts), pts, s=5, color="black", zorder=3)
                if key in paper:
                    ax.bar(left + 1.5 * half, paper[key], half, color=COLORS.get(et, "#777777"),
                           alpha=0.45, hatch="///", edgecolor="black", linewidth=0.4)
        ax.set_xticks(range(len(models)), models)
        ax.set_xlim(-0.55, max(len(models), 1) - 0.45)
        ax.set_ylabel("cold-start TTFT (s)")
        ax.set_title(backend.upper(), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if not models:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
    handles = [Patch(facecolor=COLORS.get(et, "#777777"), edgecolor="black",
                     label=LABELS.get(et, et)) for et in types]
    handles += [Patch(facecolor="#dddddd", edgecolor="black", label="ours (solid; dots = trials)"),
                Patch(facecolor="#dddddd", edgecolor="black", hatch="///", alpha=0.6,
                      label="paper (NSDI'26 Fig. 7)")]
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.88 if len(backends) == 1 else 0.92))
    return fig


def plot_breakdown(breakdown: Mapping[Key, Mapping[str, float]], ttft: Mapping[Key, float],
                   backends: Sequence[str]) -> Figure:
    """Stacked stage times of each of our cold starts, one subplot row per backend, with our
    measured TTFT as a black tick (stages may overlap, e.g. HydraServe streams fetch into load,
    so the stack can exceed the tick; a stage not measured counts as zero)."""
    fig, axes = plt.subplots(len(backends), 1, squeeze=False, figsize=(10, 3.6 * len(backends)))
    types = exec_types_shown(breakdown)
    for ax, backend in zip(axes[:, 0], backends):
        keys = [(et, m, backend) for m in models_shown(backend, breakdown) for et in types
                if breakdown.get((et, m, backend))]
        for x, key in enumerate(keys):
            bottom = 0.0
            for stage in BREAKDOWN:
                v = breakdown[key].get(stage, 0.0)
                ax.bar(x, v, 0.7, bottom=bottom, color=STAGE_COLORS[stage], edgecolor="black",
                       linewidth=0.3)
                bottom += v
            if key in ttft:
                ax.hlines(ttft[key], x - 0.4, x + 0.4, colors="black", linewidth=1.5)
        ax.set_xticks(range(len(keys)), [f"{m}\n{SHORT.get(et, et)}" for et, m, _ in keys],
                      rotation=90, fontsize=7)
        ax.set_ylabel("seconds")
        ax.set_title(f"{backend.upper()}: where each cold start spends its time "
                     "(overlapped stages may stack above the measured TTFT)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if not keys:
            ax.text(0.5, 0.5, "no measured breakdown yet", transform=ax.transAxes, ha="center")
    handles = [Patch(facecolor=STAGE_COLORS[s], edgecolor="black", label=s.removesuffix("_s"))
               for s in BREAKDOWN]
    handles.append(Line2D([], [], color="black", linewidth=1.5, label="measured TTFT"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if len(backends) == 1 else 0.96))
    return fig


def _fmt(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "-"


def _ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num is not None and den else "-"


def summary_table(ours: Mapping[Key, float], paper: Mapping[Key, float],
                  backends: Sequence[str]) -> str:
    """Per backend and model: our HydraServe and Serverless vLLM TTFTs, our speed-up, the
    paper's speed-up (serverless_vllm / hydraserve), and, where measured, the speed-up over vLLM."""
    with_vllm = any(k[0] == VLLM for k in ours)
    cols = ["backend", "model", "HS s", "SvLLM s", "speed-up", "paper speed-up"]
    if with_vllm:
        cols += ["vLLM s", "vs vLLM"]
    rows = []
    for backend in backends:
        for model in models_shown(backend, ours, paper):
            hs, sv = ours.get(("hydraserve", model, backend)), ours.get(
                ("serverless_vllm", model, backend))
            row = [backend, model, _fmt(hs), _fmt(sv), _ratio(sv, hs),
                   _ratio(paper.get(("serverless_vllm", model, backend)),
                          paper.get(("hydraserve", model, backend)))]
            if with_vllm:
                vl = ours.get((VLLM, model, backend))
                row += [_fmt(vl), _ratio(vl, hs)]
            rows.append(row)
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]

    def line(cells: Sequence[str]) -> str:  # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "figure7",
                    help="folder of our <backend>.csv files (default: %(default)s)")
    ap.add_argument("--paper", type=Path, default=ROOT / "results" / "paper" / "figure7.csv",
                    help="the paper's values (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "figs",
                    help="where the figures go (default: %(default)s)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help="comma-separated subplot rows (default: %(default)s)")
    args = ap.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends:
        ap.error("--backends names no backend")

    paper = load_paper(args.paper)
    if not paper:
        print(f"note: no paper values at {args.paper}")
    measured = load_ours(args.results, backends)
    ours = {k: m.ttft_s for k, m in measured.items() if m.ttft_s is not None}
    if not measured:
        print(f"no measurements in {args.results} for {', '.join(backends)}: "
              "plotting the paper's values only")

    args.out.mkdir(parents=True, exist_ok=True)
    bars = plot_bars(ours, paper, backends, {k: m.trials for k, m in measured.items()})
    breakdown = plot_breakdown({k: m.breakdown for k, m in measured.items()}, ours, backends)
    with PdfPages(args.out / "figure7.pdf") as pdf:
        pdf.savefig(bars)
        pdf.savefig(breakdown)
    bars.savefig(args.out / "figure7.png", dpi=150)
    breakdown.savefig(args.out / "figure7-breakdown.png", dpi=150)
    plt.close(bars)
    plt.close(breakdown)

    print(summary_table(ours, paper, backends))
    print(f"wrote {args.out / 'figure7.pdf'}, figure7.png, figure7-breakdown.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
