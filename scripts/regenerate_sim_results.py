"""Regenerate every committed simulated end-to-end result, and the expectation file that keeps
them from going stale.

    python scripts/regenerate_sim_results.py [--seeds 5] [--results results/end2end]
                                             [--expectation-only] [--no-figures]

Three parts, each timed (the times are printed and stored in the expectation file):

  1. the sweep: `ae_scripts/run_end2end_expr.py --sim --sweep --seeds N` (CV 2, 4, 8 x
     0.6, 0.7, 0.8 req/s x the four execution types x trace seeds 0..N-1): seed 0's full
     `summary.json` per setting, `seeds/seed<K>.json` per seed and `sim-aggregate.json`;
  2. the expectation file `<results>/fresh-check.json`: CV 8, 0.6 req/s on a short trace (the
     day compressed into 300 s: 180 requests, all 384 endpoints, seed 0), every execution type,
     simulated in-process through the same runner as part 1 (what
     tests/test_sim_results_fresh.py does again in ~20 s and compares exactly), plus the
     fingerprints (sha256) of every committed simulated result of part 1 (the test checks them
     too, so results from an older code cannot stay committed beside a fresh expectation);
  3. the figures: ae_scripts/figure9.py, figure11.py, figure13.py into figs/.

Cost, measured on a 2-core machine shared with other work: part 1 is ~90-120 s of CPU per
setting and seed (the trace ~8 s, each execution type 20-45 s, ServerlessLLM the slowest), so
~75 min of CPU for 5 seeds (45 setting-seeds) and ~15 min for `--seeds 1` (the wall time grows
with the machine's load: one setting took 200 s of wall for 120 s of CPU at a load of 5);
part 2 ~20 s of CPU (~30 s of wall); part 3 ~15 s.

`--no-sweep` skips part 1 and fingerprints the results as they are: for a sweep run in pieces
on this same code (e.g. one command per CV, `ae_scripts/run_end2end_expr.py --sim --cv 2
--rate 0.6 --seeds 5`, ..., each well under the sweep's time), then this script to seal them.
`--expectation-only` runs part 2 alone, for when the sweep cannot be run now: the fingerprints
are then left out, and the test of the committed results skips (saying so) until the next full
run. The simulator is deterministic: a rerun on the same code gives the same numbers (only the
summaries' `setting.wall_s` differs, which the comparison leaves out).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "end2end"
EXPECTATION = "fresh-check.json"
# The short setting of the expectation file.
CHECK = {"cv": 8.0, "rate": 0.6, "duration_s": 300.0, "per_app": 64, "seed": 0}


def _runner():
    sys.path.insert(0, str(ROOT / "ae_scripts"))
    import run_end2end_expr

    return run_end2end_expr


def comparable(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without what differs between two runs of the same code (its wall time)."""
    s = copy.deepcopy(summary)
    (s.get("setting") or {}).pop("wall_s", None)
    return s


def short_check(out: Path) -> dict[str, dict[str, Any]]:
    """Simulate the expectation's setting for every execution type into `out`, in-process
    (`hydraserve` commands run through hydraserve.cli.main instead of a subprocess: the same
    commands, in seconds less); returns exec type -> comparable summary."""
    from hydraserve import cli

    runner = _runner()

    def in_process(*argv: str) -> None:
        rc = cli.main(list(argv))
        if rc:
            raise RuntimeError(f"hydraserve {' '.join(argv)} exited with {rc}")

    saved, saved_argv = runner.hydraserve, sys.argv
    runner.hydraserve = in_process
    try:
        sys.argv = ["run_end2end_expr.py", "--sim", "--cv", f"{CHECK['cv']:g}", "--rate",
                    f"{CHECK['rate']:g}", "--duration", f"{CHECK['duration_s']:g}",
                    "--per-app", str(CHECK["per_app"]), "--seed", str(CHECK["seed"]),
                    "--out", str(out), "--no-figure"]
        runner.main()
    finally:
        runner.hydraserve, sys.argv = saved, saved_argv
    return {et: comparable(json.loads(
        (runner.run_dir(out, et, CHECK["cv"], CHECK["rate"], sim=True) / "summary.json")
        .read_text())) for et in runner.EXEC_TYPES}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprints(results: Path) -> dict[str, str]:
    """sha256 of every committed simulated result under `results` (summaries without their
    wall time, per-seed summaries, the aggregate), by path relative to `results`."""
    out: dict[str, str] = {}
    paths = [*results.glob("*-sim/summary.json"), *results.glob("*-sim/seeds/seed*.json"),
             *results.glob("sim-aggregate.json")]
    for p in sorted(paths):
        out[p.relative_to(results).as_posix()] = _digest(comparable(json.loads(p.read_text())))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="trace seeds per setting (default 5)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--expectation-only", action="store_true",
                    help="only the expectation file, without fingerprints (see above)")
    ap.add_argument("--no-sweep", action="store_true",
                    help="skip part 1: fingerprint the results already there (see above)")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    took: dict[str, float] = {}
    results = args.results
    if not args.expectation_only and not args.no_sweep:
        t = time.monotonic()
        subprocess.run([sys.executable, str(ROOT / "ae_scripts" / "run_end2end_expr.py"),
                        "--sim", "--sweep", "--seeds", str(args.seeds), "--out", str(results),
                        "--no-figure"], check=True)
        took["sweep_s"] = round(time.monotonic() - t, 1)
        print(f"part 1, the sweep ({args.seeds} seeds): {took['sweep_s']:.0f} s")
    t = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        summaries = short_check(Path(tmp))
    took["expectation_s"] = round(time.monotonic() - t, 1)
    print(f"part 2, the short check: {took['expectation_s']:.0f} s")
    expectation = {
        "what": "CV 8, 0.6 req/s on a 300 s trace (seed 0), every execution type, simulated "
                "by scripts/regenerate_sim_results.py; tests/test_sim_results_fresh.py "
                "simulates it again and compares exactly (summaries without setting.wall_s), "
                "and checks the committed simulated results against 'committed'",
        "regenerate": "python scripts/regenerate_sim_results.py",
        "generated_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "full_regeneration": not args.expectation_only,
        "sweep": ("none" if args.expectation_only else "run separately (--no-sweep)"
                  if args.no_sweep else f"run here, {args.seeds} seeds"),
        "took_s": took,
        "setting": CHECK,
        "summaries": summaries,
        "committed": None if args.expectation_only else fingerprints(results),
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / EXPECTATION).write_text(json.dumps(expectation, indent=1) + "\n")
    print(f"wrote {results / EXPECTATION}")
    if not args.expectation_only and not args.no_figures:
        t = time.monotonic()
        for fig in ("figure9.py", "figure11.py", "figure13.py"):
            subprocess.run([sys.executable, str(ROOT / "ae_scripts" / fig), "--results",
                            str(results)], check=True, stdout=subprocess.DEVNULL)
        print(f"part 3, the figures: {time.monotonic() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
