"""The paper's end-to-end experiment (Figures 9, 11, 13) on the local cluster.

    python ae_scripts/run_end2end_expr.py [--exec-types E1,E2] [--cv 8] [--rate 0.6]
        [--per-app 64] [--duration 3600] [--max-output-tokens N] [--out DIR]

For one setting (CV factor, request rate) it makes the trace once (`hydraserve workload make`:
the Azure Functions 2021 trace with --azure, else a synthetic one of the same shape), then for
every execution type starts `hydraserve serve` on the scaled hybrid testbed (2 servers of four
A10 at 64 Gbps and 4 servers of four V100 at 16 Gbps, 1/100 scale: a 13 GB model is a ~130 MB
checkpoint and a 16 Gbps NIC really moves 0.16 Gbps) serving model set 3 (`--per-app`
Llama2-13B and as many Llama2-7B endpoints per application), replays the trace against it
(`hydraserve workload replay`), stops it and analyzes the run (`hydraserve workload analyze`):
results go to `<out>/<exec_type>-cv<CV>-rate<RATE>/` (trace.jsonl, replay.jsonl,
lifecycle.jsonl, summary.json). The defaults are the paper's (64 endpoints per application per
model, one hour, outputs up to 1024 tokens); flags shrink a run to a small machine.

`--sim`: the same setting through the simulator (`hydraserve sim`, the real control plane on
a simulated cluster in virtual time) at the paper's scale (the full-size hybrid testbed, GPU
cost model) in seconds; results go to `<out>/<exec_type>-cv<CV>-rate<RATE>-sim/`.
`--sweep` with `--sim`: every CV (2, 4, 8) x rate (0.6, 0.7, 0.8) x execution type.
`--failover-at S [--takeover-s D]` with `--sim`: the control plane dies S seconds into the trace
and a standby leads D seconds later (default 2), adopting the running instances
(`hydraserve sim --failover-at`, hydraserve/sim/failover.py); results go to
`<out>/<exec_type>-cv<CV>-rate<RATE>-sim-failover<S>-takeover<D>/`, whose summary.json (source
"sim-failover", which the figures never prefer to a plain run) has a "failover" block against the
same trace without it (simulated into the folder's `without-failover/`). Not with --seeds.
`--seeds N` with `--sim`: every setting with trace seeds --seed .. --seed+N-1 (0..N-1 by
default). The first seed's full summary stays in the setting's folder (`summary.json`, as
without --seeds); every seed's short summary goes to `<folder>/seeds/seed<K>.json` (HydraServe's
with Figure 13's ratio statistics against Serverless vLLM on the same trace, when both run in
the same invocation), and `<out>/sim-aggregate.json` gets, per setting, the mean and the spread
(min, max, sample standard deviation) over the seeds; the figures draw the mean with min-max
error bars. Running a setting again (with or without --seeds) first removes its earlier
per-seed summaries and rewrites the aggregate, so it never mixes runs of two code versions.
Cost: one setting (CV, rate) with one seed, all four types, is ~90-120 s of CPU at the paper's
scale (the trace ~8 s, then 20-45 s per execution type, ServerlessLLM the slowest): the sweep
with 5 seeds is 45 of them, about 75 min of CPU.

Client mode (what ae_scripts/end2end.sh runs): `--url URL` replays against a server started by
`ae_scripts/start_server.sh 1 ...` (whose lifecycle log is in the same run folder).
`--write-configs DIR` only writes the cluster and models YAML for one execution type;
`--run-dir` prints the run folder of a setting.

HydraServe here uses its SLO- and network-aware placement (`ours`), as in the paper's
end-to-end experiment (the cold-start experiment used static(4)).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydraserve.config import cluster_to_dict  # noqa: E402
from hydraserve.store.launch import ServerProcess  # noqa: E402
from hydraserve.testbeds import END2END_GB, PAPER_MODELS, testbed, with_host_caches  # noqa: E402
from hydraserve.workload.requests import endpoints  # noqa: E402

EXEC_TYPES = ("serverless_vllm", "serverlessllm", "hydraserve", "hydraserve_with_cache")
SHARE = {"serverlessllm": False}  # ServerlessLLM runs on exclusive GPUs (PAPER.md 8)


def _num(x: float) -> str:
    return f"{x:g}"


def run_dir(out: Path, exec_type: str, cv: float, rate: float, sim: bool = False,
            failover: tuple[float, float] | None = None) -> Path:
    """A setting's run folder; ``failover``: (S, D) of a simulated failover's."""
    name = f"{exec_type}-cv{_num(cv)}-rate{_num(rate)}{'-sim' if sim else ''}"
    if failover is not None:
        name += f"-failover{_num(failover[0])}-takeover{_num(failover[1])}"
    return out / name


def write_configs(out: Path, exec_type: str, per_app: int, models_dir: Path) -> tuple[Path, Path]:
    """cluster.yaml (the scaled hybrid testbed) and models.yaml (3 * per_app endpoints of each
    model, with the SLOs of their application) for one execution type."""
    from hydraserve.workload.requests import slo

    cfg = with_host_caches(testbed("hybrid", share=SHARE.get(exec_type, True)))
    paths = {m: str(PAPER_MODELS[m].make(models_dir)) for m in END2END_GB}
    entries = []
    for ep in endpoints(per_app):
        ttft_s, tpot_ms = slo(ep.application, ep.model)
        entries.append({"name": ep.name, "path": paths[ep.model], "size_gb": END2END_GB[ep.model],
                        "ttft_slo_s": ttft_s, "tpot_slo_ms": tpot_ms})
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.yaml").write_text(yaml.safe_dump(cluster_to_dict(cfg)))
    (out / "models.yaml").write_text(yaml.safe_dump({"models": entries}))
    return out / "cluster.yaml", out / "models.yaml"


def hydraserve(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hydraserve.cli", *args], check=True)


def make_trace(path: Path, args: argparse.Namespace) -> None:
    flags = ["--cv", _num(args.cv), "--rate", _num(args.rate), "--duration",
             _num(args.duration), "--per-app", str(args.per_app), "--seed", str(args.seed),
             "--out", str(path)]
    if args.azure:
        flags += ["--azure", args.azure]
    if args.max_output_tokens:
        flags += ["--max-output-tokens", str(args.max_output_tokens)]
    hydraserve("workload", "make", *flags)


def replay(url: str, trace: Path, folder: Path, args: argparse.Namespace) -> None:
    hydraserve("workload", "replay", str(trace), "--url", url, "--out",
               str(folder / "replay.jsonl"), "--timeout", _num(args.timeout))


def analyze(folder: Path, exec_type: str, args: argparse.Namespace) -> dict:
    setting = {"testbed": "hybrid (1/100 scale, local cluster)", "per_app": args.per_app,
               "endpoints": 6 * args.per_app, "duration_s": args.duration,
               "max_output_tokens": args.max_output_tokens, "keep_alive_s": args.keep_alive,
               "kv_cache_mb": args.kv_cache_mb, "rate": args.rate, "cv": args.cv,
               "note": args.note}
    flags = ["--exec-type", exec_type, "--cv", _num(args.cv), "--rate", _num(args.rate),
             "--source", "real", "--keep-alive", _num(args.keep_alive), "--setting",
             json.dumps(setting), "--out", str(folder / "summary.json")]
    if (folder / "lifecycle.jsonl").exists():
        flags += ["--lifecycle", str(folder / "lifecycle.jsonl")]
    if args.tpot_slo_scale:
        flags += ["--tpot-slo-scale", _num(args.tpot_slo_scale)]
    hydraserve("workload", "analyze", str(folder / "replay.jsonl"), *flags)
    return json.loads((folder / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--exec-types", default=",".join(EXEC_TYPES))
    ap.add_argument("--cv", type=float, default=8, help="CV factor 2, 4 or 8 (default 8)")
    ap.add_argument("--rate", type=float, default=0.6, help="requests per second (default 0.6)")
    ap.add_argument("--per-app", type=int, default=64,
                    help="endpoints per application per model (default 64: 384 endpoints)")
    ap.add_argument("--duration", type=float, default=3600,
                    help="seconds of trace (one day compressed into it; default 3600)")
    ap.add_argument("--max-output-tokens", type=int, default=None,
                    help="cap every request's output (CPU runs; default: the trace's, <= 1024)")
    ap.add_argument("--seed", type=int, default=0, help="trace seed (default 0)")
    ap.add_argument("--seeds", type=int, default=None, metavar="N",
                    help="with --sim: run every setting with trace seeds --seed .. --seed+N-1 "
                         "and write the per-seed summaries and sim-aggregate.json (mean and "
                         "spread over the seeds)")
    ap.add_argument("--azure", default=None, help="the Azure Functions 2021 trace CSV, if you "
                                                  "have it (default: a synthetic trace)")
    ap.add_argument("--keep-alive", type=float, default=30.0)
    ap.add_argument("--kv-cache-mb", type=int, default=512,
                    help="KV cache per worker (default 512: a 1,024-token prompt plus its "
                         "output fits the 13B stand-in with room for a batch)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    ap.add_argument("--tpot-slo-scale", type=float, default=None,
                    help="judge TPOT against SLO x this (default: TTFT attainment only)")
    ap.add_argument("--note", default="", help="stored in the summary's setting")
    ap.add_argument("--out", default=str(ROOT / "results" / "end2end"))
    ap.add_argument("--models-dir", default=str(ROOT / ".cache" / "paper-models"))
    ap.add_argument("--url", default=None, help="client mode: replay against this server")
    ap.add_argument("--write-configs", default=None, metavar="DIR",
                    help="write cluster.yaml and models.yaml for the first exec type and exit")
    ap.add_argument("--run-dir", action="store_true", help="print the run folder and exit")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--cluster-backend", choices=["local", "kubernetes"], default="local")
    ap.add_argument("--sim", action="store_true",
                    help="simulate instead of running: the paper's full-scale testbed in "
                         "virtual time")
    ap.add_argument("--sweep", action="store_true",
                    help="with --sim: CV 2, 4, 8 x rate 0.6, 0.7, 0.8 (the paper's 36 runs)")
    ap.add_argument("--failover-at", type=float, default=None, metavar="S",
                    help="with --sim: the control plane dies S seconds into the trace and a "
                         "standby takes over (see above)")
    ap.add_argument("--takeover-s", type=float, default=2.0, metavar="D",
                    help="with --failover-at: seconds until the standby leads (default 2)")
    args = ap.parse_args()
    exec_types = args.exec_types.split(",")
    bad = [e for e in exec_types if e not in EXEC_TYPES]
    if bad:
        sys.exit(f"unknown exec type(s) {bad}; choose from {', '.join(EXEC_TYPES)}")
    if args.seeds is not None and (args.seeds < 1 or not args.sim):
        sys.exit("--seeds N needs --sim and N >= 1")
    if args.failover_at is not None and (not args.sim or args.seeds is not None):
        sys.exit("--failover-at needs --sim and goes without --seeds")
    out = Path(args.out)
    if args.run_dir:
        print(run_dir(out, exec_types[0], args.cv, args.rate))
        return
    if args.write_configs:
        write_configs(Path(args.write_configs), exec_types[0], args.per_app,
                      Path(args.models_dir))
        return
    from hydraserve.workload.commands import format_summary

    if args.sim:
        settings = [(cv, rate) for cv in (2, 4, 8) for rate in (0.6, 0.7, 0.8)] \
            if args.sweep else [(args.cv, args.rate)]
        simulate(out, settings, exec_types, args)
        if not args.no_figure:
            draw(out)
        return
    summaries = []
    for et in exec_types:
        folder = run_dir(out, et, args.cv, args.rate)
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / "trace.jsonl"
        make_trace(trace, args)
        if args.url:  # a server that start_server.sh runs, logging into this folder
            replay(args.url, trace, folder, args)
            summaries.append(analyze(folder, et, args))
            continue
        lifecycle = folder / "lifecycle.jsonl"
        lifecycle.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cluster, models = write_configs(Path(tmp), et, args.per_app, Path(args.models_dir))
            server = ServerProcess(["serve", "--cluster", str(cluster), "--models", str(models),
                                    "--exec-type", et, "--port", "0", "--keep-alive",
                                    _num(args.keep_alive), "--lifecycle-log", str(lifecycle),
                                    "--kv-cache-mb", str(args.kv_cache_mb),
                                    "--cluster-backend", args.cluster_backend],
                                   folder / "serve.log", timeout=600)
            try:
                replay(server.url, trace, folder, args)
            except subprocess.CalledProcessError as e:
                print(f"{et}: the replay failed ({e}); see {folder}", file=sys.stderr)
                continue
            finally:
                server.stop(timeout=180)  # deletes every instance: the log is complete
        summaries.append(analyze(folder, et, args))
    for s in summaries:
        print(format_summary(s))
    if not args.no_figure and not args.url:
        draw(out)


def simulate(out: Path, settings: list[tuple[float, float]], exec_types: list[str],
             args: argparse.Namespace) -> None:
    """Simulate every setting x execution type (x seed with --seeds): the trace is made once
    per setting and seed (every execution type replays the same one); the first seed's results
    go to the setting's folder, the others' to a scratch folder, of which only the short
    per-seed summary is kept."""
    sys.path.insert(0, str(ROOT / "ae_scripts"))
    import end2end_results as e2e

    import shutil

    first = args.seed
    seeds = range(first, first + (args.seeds or 1))
    failover = None if args.failover_at is None else (args.failover_at, args.takeover_s)
    failover_flags = [] if failover is None else \
        ["--failover-at", _num(failover[0]), "--takeover-s", _num(failover[1])]
    for cv, rate in settings:
        args.cv, args.rate = cv, rate
        for et in exec_types:  # earlier seeds' summaries of a setting run again are stale
            if failover is None:  # (a failover's run leaves the plain setting's alone)
                shutil.rmtree(run_dir(out, et, cv, rate, sim=True) / e2e.SEEDS_DIR,
                              ignore_errors=True)
        for seed in seeds:
            args.seed = seed
            summaries: dict[str, dict] = {}
            with tempfile.TemporaryDirectory() as tmp:
                trace = Path(tmp) / "trace.jsonl"  # made again from the seed in seconds
                make_trace(trace, args)
                for et in exec_types:
                    folder = run_dir(out, et, cv, rate, sim=True, failover=failover)
                    where = folder if seed == first else Path(tmp) / et
                    where.mkdir(parents=True, exist_ok=True)
                    hydraserve("sim", str(trace), "--exec-type", et, "--out", str(where),
                               "--keep-alive", _num(args.keep_alive), *failover_flags)
                    summaries[et] = json.loads((where / "summary.json").read_text())
            if args.seeds is None:
                continue
            for et, summary in summaries.items():
                base = summaries.get(e2e.FIG13_BASE) if et == e2e.FIG13_OURS else None
                short = run_dir(out, et, cv, rate, sim=True) / e2e.SEEDS_DIR / f"seed{seed}.json"
                short.parent.mkdir(parents=True, exist_ok=True)
                short.write_text(json.dumps(e2e.seed_summary(summary, seed, base), indent=1)
                                 + "\n")
    args.seed = first
    if args.seeds is None and (out / e2e.AGGREGATE).exists():
        e2e.write_aggregate(out)  # without the settings just run (their seed files are gone)
    if args.seeds is not None:
        path = e2e.write_aggregate(out)
        print(f"wrote {path}")
        for e in e2e.build_aggregate(out)["entries"]:
            t = (e.get("ttft_attainment") or {}).get("total")
            if t and (e["cv"], e["rate"]) in {(round(c, 6), round(r, 6)) for c, r in settings}:
                print(f"{e['exec_type']:>22} cv {e2e.num(e['cv'])} rate {e2e.num(e['rate'])}: "
                      f"TTFT attainment {t['mean']:.1f}% mean over {len(e['seeds'])} seeds "
                      f"(min {t['min']:.1f}, max {t['max']:.1f}, std {t['std']:.1f})")


def draw(results: Path) -> None:
    for fig in ("figure9.py", "figure11.py", "figure13.py"):
        subprocess.run([sys.executable, str(ROOT / "ae_scripts" / fig), "--results",
                        str(results)], check=False)


if __name__ == "__main__":
    main()
