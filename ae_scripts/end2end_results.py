"""Shared by figure9.py, figure11.py and figure13.py: our end-to-end run summaries, the paper's
published values, and the command-line and output conventions of the three scripts.

Our runs: every `summary.json` under the results root (normally
`<root>/<exec_type>-cv<CV>-rate<RATE>/summary.json`, but any depth works), each naming its
`exec_type`, `cv`, `rate` and `source`:

  * "real": the system really ran (`hydraserve serve` with its workers and the store). The
    committed real runs are CPU runs at reduced size and scale: a few endpoints per
    application, a 1/100-scale hybrid testbed (checkpoints and NIC rates divided by 100), CPU
    stand-ins for the GPU models, short traces at a low rate; their `setting` says which.
    Figures label them with their size and scale.
  * "sim": the simulator (`hydraserve sim`: the real control plane on a simulated full-size
    hybrid testbed in virtual time, the GPU cost model) at the paper's scale.

Several runs of one setting (exec_type, cv, rate) may exist; the one used is

  1. a "real" run before a "sim" run (before any other source), then
  2. the most recently written `summary.json` among runs of the same source.

A setting with no run falls back to the paper's published value (source "paper"), as the
artifact's figure scripts fall back to their pre-computed results.

Several trace seeds (`run_end2end_expr.py --sim --seeds N`): each simulated setting's folder
keeps seed 0's full `summary.json` and a short summary per seed in `seeds/seed<K>.json`; the
aggregate `<root>/sim-aggregate.json` holds, per setting, the mean and the spread over the
seeds (min, max and the sample standard deviation) of the TTFT and TPOT attainments (total and
per application), of the cost, and of Figure 13's ratio statistics. The figures draw a
simulated setting's mean with min-max error bars when the aggregate has it and it agrees with
the setting's `summary.json` (same value for that summary's seed; otherwise the aggregate is
stale for the setting and the summary alone is drawn).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "results" / "end2end"
DEFAULT_PAPER = ROOT / "results" / "paper"
DEFAULT_OUT = ROOT / "figs"

# The paper's four execution types of Figures 9 and 11, in its order.
EXEC_TYPES = ("serverless_vllm", "serverlessllm", "hydraserve", "hydraserve_with_cache")
LABELS = {"serverless_vllm": "Serverless vLLM", "serverlessllm": "ServerlessLLM",
          "hydraserve": "HydraServe", "hydraserve_with_cache": "HydraServe + cache"}
COLORS = {"serverless_vllm": "#4c72b0", "serverlessllm": "#dd8452", "hydraserve": "#c44e52",
          "hydraserve_with_cache": "#55a868"}
APPLICATIONS = ("chatbot", "code", "summarization")
PAPER_CVS = (2.0, 4.0, 8.0)
PAPER_RATES = (0.6, 0.7, 0.8)
# The setting of Figures 11 and 13.
FIG11_CV, FIG11_RATE = 8.0, 0.6
# Lower rank wins when several runs share a setting; unknown sources rank after both.
SOURCE_RANK = {"real": 0, "sim": 1}
PAPER = "paper"

Key = tuple[str, float, float]  # (exec_type, cv, rate)
_DIR_RE = re.compile(r"^(?P<et>.+)-cv(?P<cv>[0-9.]+)-rate(?P<rate>[0-9.]+)$")


def num(x: float) -> str:
    """A CV or rate as the run folders spell it (`f"{x:g}"`: 8, 0.6)."""
    return f"{float(x):g}"


def key(exec_type: str, cv: float, rate: float) -> Key:
    """A setting key whose floats compare equal however the summary wrote them (8 or 8.0)."""
    return (exec_type, round(float(cv), 6), round(float(rate), 6))


def _pct(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


@dataclass(frozen=True)
class Run:
    """One end-to-end run: where its summary lies and the summary itself."""
    exec_type: str
    cv: float
    rate: float
    source: str
    path: Path
    summary: dict[str, Any]

    def ttft(self, part: str = "total") -> float | None:
        """TTFT SLO attainment in percent, in total or for one application; None if absent."""
        return _pct((self.summary.get("ttft_attainment") or {}).get(part))

    def tpot(self, part: str = "total") -> float | None:
        """TPOT SLO attainment in percent; None when not measured (e.g. CPU runs)."""
        return _pct((self.summary.get("tpot_attainment") or {}).get(part))

    def endpoints(self) -> dict[str, dict[str, Any]]:
        """The per-endpoint figures, by endpoint name."""
        return dict(self.summary.get("per_endpoint") or {})


def _read_run(path: Path) -> Run | None:
    """One summary.json as a Run; the setting comes from the file, else from the folder name."""
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"note: skipping unreadable {path}: {e}", file=sys.stderr)
        return None
    if not isinstance(s, dict):
        return None
    m = _DIR_RE.match(path.parent.name)
    et = s.get("exec_type") or (m and m["et"])
    cv = s.get("cv") if s.get("cv") is not None else (m and m["cv"])
    rate = s.get("rate") if s.get("rate") is not None else (m and m["rate"])
    if not et or cv is None or rate is None:
        print(f"note: skipping {path}: no exec_type/cv/rate", file=sys.stderr)
        return None
    return Run(str(et), float(cv), float(rate), str(s.get("source") or "unknown"), path, s)


def choose(runs: Iterable[Run]) -> Run | None:
    """The run a figure uses among runs of one setting: real before sim, then the newest."""
    def order(r: Run) -> tuple[int, float]:
        try:
            mtime = r.path.stat().st_mtime
        except OSError:
            mtime = 0.0
        return (SOURCE_RANK.get(r.source, len(SOURCE_RANK)), -mtime)

    return min(runs, key=order, default=None)


def load_runs(results: Path) -> dict[Key, Run]:
    """The run used for each setting found under `results` (nothing if the folder is absent)."""
    groups: dict[Key, list[Run]] = {}
    if results.is_dir():
        for path in sorted(results.rglob("summary.json")):
            run = _read_run(path)
            if run is not None:
                groups.setdefault(key(run.exec_type, run.cv, run.rate), []).append(run)
    return {k: r for k, rs in groups.items() if (r := choose(rs)) is not None}


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        print(f"note: no paper values at {path}", file=sys.stderr)
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _float(cell: str | None) -> float | None:
    cell = (cell or "").strip()
    return float(cell) if cell else None


def load_paper_fig9(paper_dir: Path) -> dict[Key, float]:
    """Figure 9: (exec_type, cv, rate) -> total TTFT SLO attainment in percent."""
    return {key(r["exec_type"], float(r["cv"]), float(r["rate"])): float(r["ttft_attainment"])
            for r in _rows(paper_dir / "figure9.csv")}


def load_paper_fig11(paper_dir: Path) -> dict[tuple[str, str], float]:
    """Figure 11 (CV 8, 0.6 req/s): (exec_type, application) -> TTFT attainment in percent."""
    return {(r["exec_type"], r["application"]): float(r["ttft_attainment"])
            for r in _rows(paper_dir / "figure11.csv")}


def load_paper_fig13(paper_dir: Path) -> dict[str, dict[str, float | None]]:
    """Figure 13 summary statistics: metric (tpot_ratio | cost_ratio) -> mean, median,
    frac_below_1 (None where the paper gives none)."""
    return {r["metric"]: {"mean": _float(r["mean"]), "median": _float(r["median"]),
                          "frac_below_1": _float(r.get("frac_below_1"))}
            for r in _rows(paper_dir / "figure13.csv")}


def source_label(source: str) -> str:
    """How a value's origin is named in titles, legends and tables."""
    return PAPER if source == PAPER else f"ours ({source})"


def bar_style(source: str, color: str) -> dict[str, Any]:
    """Bar keywords that show where a value comes from: ours "real" solid, ours "sim" (or any
    other source) dotted, the paper's alone white with coloured hatching."""
    if source == PAPER:
        return {"color": "white", "edgecolor": color, "hatch": "///", "linewidth": 1.0}
    if source == "real":
        return {"color": color, "edgecolor": "black", "linewidth": 0.5}
    return {"color": color, "edgecolor": "black", "hatch": "..", "alpha": 0.8, "linewidth": 0.5}


def bar_legend(exec_types: Sequence[str] = EXEC_TYPES) -> list[Artist]:
    """Legend entries for the bar figures: the colours, then the three sources and the tick."""
    handles: list[Artist] = [Patch(facecolor=COLORS[et], edgecolor="black", label=LABELS[et])
                             for et in exec_types]
    handles += [Patch(facecolor="#999999", edgecolor="black", label="ours (real)"),
                Patch(facecolor="#999999", edgecolor="black", hatch="..", label="ours (sim)"),
                Patch(facecolor="white", edgecolor="#555555", hatch="///",
                      label="paper only (no run)"),
                Line2D([], [], color="black", linewidth=2.0, label="paper value")]
    return handles


def ours_label(sources: Iterable[str]) -> str:
    """'ours (real, sim)' for the sources of the values drawn, or a note that none is ours."""
    mine = sorted(set(sources) - {PAPER})
    return f"ours ({', '.join(mine)})" if mine else "no runs of ours: paper only"


def ratio_stats(ratios: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and the fraction below 1.0 of a list of ratios (all None when empty)."""
    if not ratios:
        return {"mean": None, "median": None, "frac_below_1": None}
    return {"mean": statistics.fmean(ratios), "median": statistics.median(ratios),
            "frac_below_1": sum(r < 1.0 for r in ratios) / len(ratios)}


def parser(doc: str | None, *, figure: str, setting: bool = False) -> argparse.ArgumentParser:
    """The options every end-to-end figure script takes: --results, --paper, --out, --json;
    with ``setting`` also --cv and --rate (the setting of our runs to show, default the
    paper's CV 8 at 0.6 req/s)."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                    help="root of our run folders <exec_type>-cv<CV>-rate<RATE>/summary.json "
                         "(default: %(default)s)")
    ap.add_argument("--paper", type=Path, default=DEFAULT_PAPER,
                    help=f"folder holding the paper's {figure}.csv (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="where the figures go (default: %(default)s)")
    ap.add_argument("--json", action="store_true",
                    help="print the plotted values as one JSON object on the last stdout line")
    if setting:
        ap.add_argument("--cv", type=float, default=FIG11_CV,
                        help="CV of our runs to show (default: %(default)g, the paper's)")
        ap.add_argument("--rate", type=float, default=FIG11_RATE,
                        help="request rate of our runs to show (default: %(default)g, the "
                             "paper's)")
    return ap


def save(fig: Figure, out: Path, stem: str) -> list[Path]:
    """Write `<out>/<stem>.pdf` and `<out>/<stem>.png`; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.pdf", out / f"{stem}.png"]
    fig.savefig(paths[0])
    fig.savefig(paths[1], dpi=150)
    return paths


def fmt(v: float | None, digits: int = 1) -> str:
    """A number for the tables, '-' when missing."""
    return "-" if v is None else f"{v:.{digits}f}"


def versus(row: dict) -> list[str]:
    """The cells "ours %", "paper %", "ours-paper" of one bar's row."""
    ours = row["ttft_attainment"] if row["source"] != PAPER else None
    pv = row["paper_ttft_attainment"]
    return [fmt(ours), fmt(pv), fmt(ours - pv if ours is not None and pv is not None else None)]


def table(cols: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows)])


def emit_json(obj: Mapping[str, Any]) -> None:
    """The machine-readable result, alone on the last stdout line."""
    sys.stdout.flush()
    print(json.dumps(obj, sort_keys=False))


# ---- several seeds: the aggregate of the simulated settings ----------------------------------

AGGREGATE = "sim-aggregate.json"
SEEDS_DIR = "seeds"
_PARTS = ("total", *APPLICATIONS)
FIG13_BASE, FIG13_OURS = "serverless_vllm", "hydraserve"
FIG13_FIELDS = {"tpot_ratio": "tpot_ms_mean", "cost_ratio": "cost_gbs_per_request"}


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
        and math.isfinite(v) else None


def summary_ratios(ours: Mapping[str, Any], base: Mapping[str, Any],
                   field: str) -> dict[str, float]:
    """Endpoint -> ours / base of a per-endpoint field of two summaries (endpoints with a value
    in both and a positive baseline value), as Figure 13 computes it."""
    mine, theirs = ours.get("per_endpoint") or {}, base.get("per_endpoint") or {}
    out: dict[str, float] = {}
    for name in sorted(set(mine) & set(theirs)):
        a, b = _number(mine[name].get(field)), _number(theirs[name].get(field))
        if a is not None and b is not None and b > 0:
            out[name] = a / b
    return out


def seed_summary(summary: Mapping[str, Any], seed: int,
                 base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The short per-seed summary kept in `seeds/seed<K>.json`: the setting, the seed, the
    attainments, the cost and the TTFT percentiles; with `base` (Serverless vLLM's summary of
    the same trace, for a HydraServe summary) also Figure 13's ratio statistics."""
    out = {k: summary.get(k) for k in ("exec_type", "cv", "rate", "source", "requests",
                                       "answered", "failed", "ttft_attainment",
                                       "tpot_attainment", "cost_gbs_per_request", "instances",
                                       "ttft_s")}
    out["seed"] = seed
    if base is not None:
        out["figure13"] = {}
        for metric, field in FIG13_FIELDS.items():
            r = list(summary_ratios(summary, base, field).values())
            out["figure13"][metric] = {**ratio_stats(r), "n": len(r)}
    return out


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, min, max and sample standard deviation (0 for one value) of per-seed values."""
    v = [float(x) for x in values]
    return {"mean": statistics.fmean(v), "min": min(v), "max": max(v),
            "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}


def build_aggregate(results: Path) -> dict[str, Any]:
    """The aggregate of every `<results>/*/seeds/seed<K>.json`, one entry per setting."""
    groups: dict[Key, list[dict[str, Any]]] = {}
    for path in sorted(results.glob(f"*/{SEEDS_DIR}/seed*.json")):
        try:
            s = json.loads(path.read_text())
            k = key(s["exec_type"], s["cv"], s["rate"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"note: skipping {path}: {e}", file=sys.stderr)
            continue
        groups.setdefault(k, []).append(s)
    entries = []
    for (et, cv, rate), seeds in sorted(groups.items()):
        seeds.sort(key=lambda s: s["seed"])
        e: dict[str, Any] = {"exec_type": et, "cv": cv, "rate": rate,
                             "source": seeds[0].get("source"),
                             "seeds": [s["seed"] for s in seeds]}
        for metric in ("ttft_attainment", "tpot_attainment"):
            parts = {}
            for part in _PARTS:
                vals = [_number((s.get(metric) or {}).get(part)) for s in seeds]
                if all(v is not None for v in vals):
                    parts[part] = spread(vals)
            e[metric] = parts
        cost = [_number(s.get("cost_gbs_per_request")) for s in seeds]
        e["cost_gbs_per_request"] = spread(cost) if all(c is not None for c in cost) else None
        if all("figure13" in s for s in seeds):
            e["figure13"] = {}
            for metric in FIG13_FIELDS:
                stats_ = {}
                for stat in ("mean", "median", "frac_below_1"):
                    vals = [_number(s["figure13"][metric].get(stat)) for s in seeds]
                    if all(v is not None for v in vals):
                        stats_[stat] = spread(vals)
                e["figure13"][metric] = stats_
        entries.append(e)
    return {"what": "per simulated setting, the mean and the spread over trace seeds; "
                    "spread = min and max over the seeds, std = sample standard deviation; "
                    "'values' are per seed, in the order of 'seeds'",
            "entries": entries}


def write_aggregate(results: Path) -> Path:
    """Build the aggregate of `results` and write it to `<results>/sim-aggregate.json`."""
    path = results / AGGREGATE
    path.write_text(json.dumps(build_aggregate(results), indent=1) + "\n")
    return path


def load_aggregate(results: Path) -> dict[Key, dict[str, Any]]:
    """The aggregate's entries by setting (empty when there is none)."""
    path = results / AGGREGATE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {key(e["exec_type"], e["cv"], e["rate"]): e for e in data["entries"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"note: ignoring unreadable {path}: {e}", file=sys.stderr)
        return {}


def run_seed(run: Run) -> int | None:
    """The trace seed of a run (from its summary's setting), None when it does not say."""
    trace = (run.summary.get("setting") or {}).get("trace") or {}
    seed = trace.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def seed_entry(run: Run | None, agg: Mapping[Key, Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The aggregate entry of a run's setting when it applies: a simulated run, an entry with at
    least two seeds including the run's own, whose total TTFT attainment for that seed is the
    run's (else the aggregate is stale for the setting and None is returned)."""
    if run is None or run.source != "sim":
        return None
    e = agg.get(key(run.exec_type, run.cv, run.rate))
    seed = run_seed(run)
    if not e or seed is None or seed not in e.get("seeds", []) or len(e["seeds"]) < 2:
        return None
    total = (e.get("ttft_attainment") or {}).get("total")
    mine = run.ttft()
    if not total or mine is None or abs(total["values"][e["seeds"].index(seed)] - mine) > 1e-6:
        return None
    return e


def seed_spread(run: Run | None, agg: Mapping[Key, Mapping[str, Any]],
                part: str = "total") -> dict[str, Any] | None:
    """The TTFT attainment spread of `part` over the seeds of a run's setting (see seed_entry),
    None when the aggregate does not apply."""
    e = seed_entry(run, agg)
    return None if e is None else (e.get("ttft_attainment") or {}).get(part)


def scale_label(run: Run) -> str | None:
    """How a real run's reduced size and scale are named in the figures ("CPU run: 24
    endpoints, 1/100 scale, 0.05 req/s x 600 s"), None for other sources."""
    if run.source != "real":
        return None
    st = run.summary.get("setting") or {}
    scale = re.search(r"1/\d+ scale", str(st.get("testbed") or ""))
    bits = [f"{st['endpoints']} endpoints" if st.get("endpoints") else None,
            scale.group(0) if scale else None,
            f"{num(st['duration_s'])} s" if st.get("duration_s") else None]
    return "CPU run: " + ", ".join(b for b in bits if b) if any(bits) else "CPU run"
