"""The paper's cold-start experiment (Figure 7) on the local cluster, end to end.

    python ae_scripts/run_figure7_expr.py [--quick] [--backends a10,v100] [--exec-types ...]
        [--models M1,M2 | --model-sets 0,1] [--trials 3] [--keep-alive 30] [--out DIR]

For every backend (scaled testbed) and execution type it starts `hydraserve serve` on that
testbed, then for every model sends --trials streamed requests, each after the model scaled to
zero (so every trial is cold), and records TTFT and TPOT as the paper does: the mean of the two
smallest trials. HydraServe runs as static(4), as in the paper's cold-start experiment. Rows go
to `<out>/<backend>.csv` (replacing earlier rows of the same exec type and model), then
ae_scripts/figure7.py draws figs/figure7.pdf. `--quick`: the a10 testbed, two models, the
keep-alive shortened to 2 s (about 10 minutes on a 2-core machine).

Client mode (what ae_scripts/coldstart.sh runs): `--url URL` measures a server started by
ae_scripts/start_server.sh instead of starting one. `--write-configs DIR` only writes the
cluster and models YAML of one backend / model set and exits.

Exec type `vllm` is the genuine vLLM as the serverless_vllm worker (`hydraserve serve
--exec-type serverless_vllm --engine vllm`): it runs when a Python with vLLM is found (see the
README) and is skipped with a message otherwise; `--vllm-python` names one.

Breakdown columns (seconds, from the head worker's timeline on this machine's clock):
queue_s = request sent -> worker spawned; init_s = spawned -> torch and the engine imported;
fetch_s = region attached -> all weights loaded (the fetch, with loading overlapped);
load_s = weights loaded -> engine ready; first_token_s = engine ready -> first token;
profile_s = weights loaded -> profiled, the part of load_s that is the stock engine's profiling
pass emulated on the scaled testbeds (the baselines only; their fetch_s includes the emulated
loader's copy; `ScaleConfig.emulate_gpu_costs`).
For `vllm` rows: fetch_s = the download of the model to the node's disk; load_s = vLLM's own
weight load (from its log); init_s = the rest of vLLM's start (imports, engine init, profiling,
KV cache, warm-up).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydraserve.config import cluster_to_dict  # noqa: E402
from hydraserve.httpjson import call  # noqa: E402
from hydraserve.protocol import ProtocolError, WorkerHealth  # noqa: E402
from hydraserve.store.launch import ServerProcess  # noqa: E402
from hydraserve.testbeds import (MODEL_SETS, PAPER_MODELS, testbed,  # noqa: E402
                                 with_host_caches)

EXEC_TYPES = ("serverless_vllm", "serverlessllm", "serverlessllm_with_cached_model",
              "hydraserve_with_single_worker", "hydraserve", "vllm")
FIELDS = ["exec_type", "model", "backend", "ttft_s", "tpot_ms", "trials", "queue_s", "fetch_s",
          "load_s", "init_s", "first_token_s", "profile_s"]
QUICK_MODELS = ("OPT-2.7B", "Llama2-7B")
SHARE = {"serverlessllm": False, "serverlessllm_with_cached_model": False}  # PAPER.md 8
# The fp16 checkpoints' bytes at the paper's scale (--sim): 2 bytes per parameter, the
# parameter counts of the models' cards and configs (OPT-2.7B 2.65e9, OPT-6.7B 6.66e9, OPT-13B
# 12.85e9, Llama-2-7B 6.74e9, Llama-2-13B 13.02e9, Llama-3-8B 8.03e9, Falcon-7B 6.92e9). What a
# cold start fetches and loads (PAPER.md 10's sizes round up: 7 GB for OPT-2.7B's 5.3); the
# simulated placement claims them too (each still fits: Llama-3-8B 16.1 + 5 <= 22 GB, A10).
CHECKPOINT_GB = {"OPT-2.7B": 5.3, "OPT-6.7B": 13.3, "OPT-13B": 25.7, "Llama2-7B": 13.5,
                 "Llama2-13B": 26.0, "Llama3-8B": 16.1, "Falcon-7B": 13.8}


def write_configs(out: Path, backend: str, models: list[str], exec_type: str,
                  models_dir: Path) -> tuple[Path, Path]:
    cluster = cluster_to_dict(with_host_caches(testbed(backend, share=SHARE.get(exec_type, True))))
    entries = []
    for name in models:
        m = PAPER_MODELS[name]
        # placement uses the paper's size (the stand-in's bytes are within a few % of it; a
        # 27 GB OPT-13B would need ceil(27 + 5) = 33 GB and no longer fit a 32 GB V100)
        entries.append({"name": name, "path": str(m.make(models_dir)), "size_gb": m.paper_gb,
                        "ttft_slo_s": 7.5 if m.paper_gb <= 15 else 12.0})
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    (out / "models.yaml").write_text(yaml.safe_dump({"models": entries}))
    return out / "cluster.yaml", out / "models.yaml"


def serve_args(exec_type: str, vllm_python: str | None = None) -> list[str]:
    """The `hydraserve serve` flags of one row of the figure."""
    if exec_type == "vllm":
        return ["--exec-type", "serverless_vllm", "--engine", "vllm",
                *(["--vllm-python", vllm_python] if vllm_python else [])]
    if exec_type == "hydraserve":
        return ["--exec-type", "hydraserve", "--static-p", "4"]  # as in the paper's experiment
    return ["--exec-type", exec_type]


def _instances(url: str, model: str) -> list[dict]:
    return [i for i in call(url, "GET", "/admin/instances")["instances"] if i["model"] == model]


def _evict_host_caches(url: str, model: str) -> None:
    """ServerlessLLM without a cached model: each trial finds the model out of host memory."""
    for agent in call(url, "GET", "/admin/instances")["agents"].values():
        for r in call(agent, "GET", "/regions")["regions"]:
            if r["model"] == model and r["cached"] and not r["readers"]:
                call(agent, "DELETE", f"/regions/{r['id']}")


def _pool_ready(url: str, n: int) -> bool:
    """Every server's warm runtimes (n each) have finished their imports."""
    pools = call(url, "GET", "/admin/instances").get("warm_runtimes") or {}
    return bool(pools) and all(p["imported"] >= n for p in pools.values())


def one_trial(url: str, model: str, evict: bool = False, warm: int = 0) -> dict:
    import openai

    deadline = time.monotonic() + 300
    while (_instances(url, model) or (warm and not _pool_ready(url, warm))) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    if evict:
        _evict_host_caches(url, model)
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    sent = time.time()
    stamps: list[float] = []
    timeline: dict = {}
    vllm_load = None
    for chunk in client.completions.create(model=model, prompt="def main():", max_tokens=16,
                                           stream=True, temperature=0,
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.time())
            if len(stamps) == 1:
                try:
                    head = _instances(url, model)[0]["stages"][0]["url"]
                    health = WorkerHealth.from_json(call(head, "GET", "/health"))
                    timeline, vllm_load = health.timeline, health.extra.get("vllm_load_s")
                except (IndexError, KeyError, RuntimeError, ProtocolError):
                    timeline = {}
    t = {k: v - sent for k, v in timeline.items()}
    ttft = stamps[0] - sent
    gap = lambda a, b: round(max(0.0, t[b] - t[a]), 4) if a in t and b in t else None  # noqa
    if "vllm_started" in t:  # the genuine vLLM: its start is one block, its load from its log
        start = gap("vllm_started", "engine_ready")
        init = None if start is None else round(start - (vllm_load or 0.0), 4)
        load = vllm_load
    else:
        init, load = gap("spawned", "imports_done"), gap("weights_ready", "engine_ready")
    return {"ttft_s": ttft,
            "tpot_ms": (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) * 1000,
            "queue_s": round(t["spawned"], 4) if "spawned" in t else None,
            "init_s": init, "fetch_s": gap("attached", "weights_ready"), "load_s": load,
            "first_token_s": round(ttft - t["engine_ready"], 4) if "engine_ready" in t else None,
            "profile_s": gap("weights_ready", "profiled")}


def measure(url: str, exec_type: str, backend: str, models: list[str], trials: int,
            warm: int = 0) -> list[dict]:
    """Rows for ``exec_type`` (named ``exec_type+warm`` when measured with ``warm`` runtimes)."""
    rows = []
    name = exec_type + ("+warm" if warm else "")
    for model in models:
        try:
            runs = [one_trial(url, model, evict=exec_type == "serverlessllm", warm=warm)
                    for _ in range(trials)]
        except Exception as e:  # noqa: BLE001 - one model failing must not end the experiment
            print(f"{name} {model} on {backend}: FAILED ({type(e).__name__}: {e}); "
                  "no row written", file=sys.stderr, flush=True)
            continue
        best = sorted(runs, key=lambda r: r["ttft_s"])[:2]  # the paper: mean of the two smallest
        mean = lambda k: statistics.mean(r[k] for r in best if r[k] is not None) \
            if any(r[k] is not None for r in best) else None  # noqa: E731
        row = {"exec_type": name, "model": model, "backend": backend,
               "ttft_s": round(mean("ttft_s"), 4), "tpot_ms": round(mean("tpot_ms"), 3),
               "trials": ";".join(f"{r['ttft_s']:.3f}" for r in runs)}
        for k in ("queue_s", "fetch_s", "load_s", "init_s", "first_token_s", "profile_s"):
            v = mean(k)
            row[k] = "" if v is None else round(v, 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def save(rows: list[dict], path: Path) -> None:
    """Merge rows into a results CSV, replacing earlier (exec_type, model, backend) rows."""
    old = []
    if path.exists():
        with open(path) as f:
            old = list(csv.DictReader(f))
    keys = {(r["exec_type"], r["model"], r["backend"]) for r in rows}
    merged = [r for r in old if (r["exec_type"], r["model"], r["backend"]) not in keys] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(merged)


def fits(backend: str, model: str) -> bool:
    """The paper's 13B models do not fit an A10 (22 GB usable; a model needs its size + 5)."""
    return backend != "a10" or PAPER_MODELS[model].paper_gb + 5 <= 22


def simulate_rows(backend: str, exec_type: str, models: list[str],
                  local_cpu: bool = False) -> list[dict]:
    """One cold start per model through the simulator: at the paper's scale (the full-size
    testbed, GPU cost model), or with ``local_cpu`` as our scaled local testbed (the cost model
    of our own workers on a 2-core machine). Deterministic: one trial is every trial."""
    import logging

    quiet = logging.getLogger("hydraserve")  # one start per model: its log lines are noise
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _simulate_rows(backend, exec_type, models, local_cpu)
    finally:
        quiet.setLevel(level)  # a caller in this process (a test run) keeps its logging


def _simulate_rows(backend: str, exec_type: str, models: list[str],
                   local_cpu: bool) -> list[dict]:
    from hydraserve.sim.costmodel import CostModel
    from hydraserve.sim.run import SimSetting, simulate
    from hydraserve.workload.make import TraceRecord

    cfg = with_host_caches(testbed(backend, share=SHARE.get(exec_type, True)))
    rows = []
    for model in models:
        gb = PAPER_MODELS[model].paper_gb
        slo = 7.5 if gb <= 15 else 12.0
        record = TraceRecord(0.0, model, model, "chatbot", 4, 16, slo, 200.0)
        setting = SimSetting(exec_type, cfg,
                             CostModel.local_cpu() if local_cpu else CostModel.gpu_default(),
                             static_p=4 if exec_type == "hydraserve" else None,
                             sizes_gb=((model, gb if local_cpu else CHECKPOINT_GB[model]),),
                             device="cpu" if local_cpu else None)
        with tempfile.TemporaryDirectory() as tmp:
            (res,), _ = simulate([record], setting, tmp)
        if res["error"] is not None:
            print(f"{exec_type} {model} on {backend} (sim): FAILED ({res['error']})",
                  file=sys.stderr)
            continue
        row = {"exec_type": exec_type, "model": model, "backend": backend,
               "ttft_s": round(res["ttft_s"], 4), "tpot_ms": round(res["tpot_ms"] or 0.0, 3),
               "trials": f"{res['ttft_s']:.3f}", "queue_s": "", "fetch_s": "", "load_s": "",
               "init_s": "", "first_token_s": "", "profile_s": ""}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def model_names(models: str | None, model_sets: str) -> list[str]:
    """--models, or else the models of --model-sets; exits on a name without a stand-in."""
    names = models.split(",") if models else \
        [m for s in model_sets.split(",") for m in MODEL_SETS[int(s)]]
    unknown = [m for m in names if m not in PAPER_MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; choose from {', '.join(PAPER_MODELS)}")
    return names


def run_sim(args: argparse.Namespace) -> None:
    """`--sim`: every backend, model and exec type (not `vllm`) through the simulator."""
    out = Path(args.out) if args.out != str(ROOT / "results" / "figure7") \
        else ROOT / "results" / ("figure7-simlocal" if args.sim_local else "figure7-sim")
    names = model_names(args.models, args.model_sets)
    for backend in args.backends.split(","):
        fit = [m for m in names if fits(backend, m)]
        for et in [e for e in args.exec_types.split(",") if e != "vllm"]:
            save(simulate_rows(backend, et, fit, args.sim_local), out / f"{backend}.csv")
    if not args.no_figure:
        subprocess.run([sys.executable, str(ROOT / "ae_scripts" / "figure7.py"), "--results",
                        str(out), "--out", str(ROOT / "figs" / out.name)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a10 only, two models, keep-alive 2 s")
    ap.add_argument("--backends", default="a10,v100")
    ap.add_argument("--exec-types", default=",".join(EXEC_TYPES))
    ap.add_argument("--model-sets", default="0,1", help="the paper's model sets (default 0,1)")
    ap.add_argument("--models", default=None, help="explicit model names instead of sets")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--keep-alive", type=float, default=30.0,
                    help="seconds before a model scales to zero (the paper: 30)")
    ap.add_argument("--out", default=str(ROOT / "results" / "figure7"))
    ap.add_argument("--models-dir", default=str(ROOT / ".cache" / "paper-models"))
    ap.add_argument("--url", default=None, help="client mode: measure this running server")
    ap.add_argument("--write-configs", default=None, metavar="DIR",
                    help="write cluster.yaml and models.yaml for one backend and exit")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--warm-runtime", type=int, default=0, metavar="N",
                    help="run with N pre-started worker runtimes per server (serve "
                         "--warm-runtime) and save the rows as TYPE+warm, beside the "
                         "paper-faithful ones: a platform feature, not the paper's (not for the "
                         "genuine vLLM)")
    ap.add_argument("--cluster-backend", choices=["local", "kubernetes"], default="local",
                    help="local (default): the scaled testbed on this machine; kubernetes: a "
                         "cluster's labelled nodes (passed to `hydraserve serve`; see "
                         "scripts/kubernetes/README.md)")
    ap.add_argument("--vllm-python", default=None,
                    help="a Python with vLLM for the `vllm` exec type (default: "
                         "HYDRASERVE_VLLM_PYTHON, this one, then /opt/vllm-venv/bin/python)")
    ap.add_argument("--sim", action="store_true",
                    help="simulate the paper's full-scale testbeds instead (seconds; results "
                         "to results/figure7-sim unless --out)")
    ap.add_argument("--sim-local", action="store_true",
                    help="with --sim: simulate our scaled local testbed (the cost model of our "
                         "workers on this 2-core machine) to check the simulator against the "
                         "real runs in results/figure7 (default out: results/figure7-simlocal)")
    args = ap.parse_args()
    if args.sim:
        run_sim(args)
        return
    if args.quick:
        args.backends, args.keep_alive = "a10", min(args.keep_alive, 2.0)
        args.models = args.models or ",".join(QUICK_MODELS)
    backends = args.backends.split(",")
    models = model_names(args.models, args.model_sets)
    exec_types = args.exec_types.split(",")
    bad = [e for e in exec_types if e not in EXEC_TYPES + ("hydraserve_with_cache",)]
    if bad:
        sys.exit(f"unknown exec type(s) {bad}; choose from {', '.join(EXEC_TYPES)}")
    vllm_python = None
    if "vllm" in exec_types and not args.url and not args.write_configs:
        from hydraserve.worker.vllm_worker import find_vllm_python

        vllm_python = find_vllm_python(
            args.vllm_python or os.environ.get("HYDRASERVE_VLLM_PYTHON"))
        if vllm_python is None:
            print("no Python with vLLM found: skipping the `vllm` rows (see the README to "
                  "install the vLLM peer, or give --vllm-python)", file=sys.stderr)
            exec_types.remove("vllm")
    if args.write_configs:
        write_configs(Path(args.write_configs), backends[0], models, exec_types[0],
                      Path(args.models_dir))
        return
    if args.url:
        save(measure(args.url, exec_types[0], backends[0], models, args.trials),
             Path(args.out) / f"{backends[0]}.csv")
        return
    for backend in backends:
        fit = [m for m in models if fits(backend, m)]
        for et in exec_types:
            with tempfile.TemporaryDirectory() as tmp:
                cluster, models_yaml = write_configs(Path(tmp), backend, fit, et,
                                                     Path(args.models_dir))
                warm = args.warm_runtime if et != "vllm" else 0
                server = ServerProcess(["serve", "--cluster", str(cluster), "--models",
                                        str(models_yaml), *serve_args(et, vllm_python),
                                        "--port", "0", "--keep-alive", str(args.keep_alive),
                                        "--cluster-backend", args.cluster_backend,
                                        "--warm-runtime", str(warm)],
                                       Path(tmp) / "serve.log", timeout=600)
                try:
                    rows = measure(server.url, et, backend, fit, args.trials, warm)
                finally:
                    server.stop()
                save(rows, Path(args.out) / f"{backend}.csv")
    if not args.no_figure:
        subprocess.run([sys.executable, str(ROOT / "ae_scripts" / "figure7.py"), "--results",
                        args.out], check=False)


if __name__ == "__main__":
    main()
