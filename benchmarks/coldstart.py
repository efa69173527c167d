"""Cold-start benchmark: TTFT of a cold request for every execution type on a local cluster whose
emulated NICs make the fetch dominate, beside the fetch floor S / (p B); and the time the gateway
adds to a warm request.

    python benchmarks/coldstart.py [--trials 3] [--exec-types a,b,...] [--json]
    python benchmarks/coldstart.py --default-setting [--exec-types ...]

--default-setting: what `hydraserve serve` runs with no arguments instead (SmolLM2-135M-Instruct,
269 MB = 26.9 GB in the paper's units, TTFT SLO 12 s, 4 servers with one 32 GB GPU and a 16 Gbps
NIC each; the model is converted once into ~/.cache/hydraserve, or HYDRASERVE_CACHE).

Each execution type gets its own `hydraserve serve` (4 servers with one 24 GB GPU and an 8 Gbps
NIC each in the paper's units, scaled by 1/100: really 0.08 Gbps; the ~128 MB demo model counts
as 12.8 GB; TTFT SLO 7.5 s). The NIC is half the paper's A10 so that the fetch dominates the
~3 s (per process, on shared cores) this machine needs to start a worker. A trial waits until the model has scaled to zero, then times one
streamed request from sending to its first token. TTFT = median of the trials.
`hydraserve:static4` is HydraServe placed as static(4), as in the paper's cold-start experiment.

--warm-runtime N: every execution type runs with N pre-started worker runtimes per server (serve
--warm-runtime; a trial starts once every server's pool has finished its imports), the same JSON
keys; with --side-by-side each execution type also runs without the pool in the same invocation
(the rows `TYPE` and `TYPE+warm`), so that the ratios are measured side by side. Every row gives
its ratio to the floor S / (p B) and to the stage floor, the fetch of the largest stage image
(a tied embedding is fetched by both end stages, and layers are whole).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import gateway_overhead_ms  # noqa: E402
from hydraserve.httpjson import call  # noqa: E402
from hydraserve.make_model import ModelSpec, make_model  # noqa: E402
from hydraserve.store.launch import ServerProcess  # noqa: E402

MODEL = "demo"  # the served name

EXEC_TYPES = ["serverless_vllm", "serverlessllm", "serverlessllm_with_cached_model",
              "hydraserve_with_single_worker", "hydraserve", "hydraserve_with_cache",
              "hydraserve:static4"]
NIC_GBPS = 8.0  # small enough that the fetch dominates this machine's worker start


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _instances(url: str) -> list[dict]:
    return _get(url + "/admin/instances")["instances"]


def _evict_host_caches(url: str) -> None:
    """ServerlessLLM without a cached model: every trial starts with empty host caches."""
    for agent in _get(url + "/admin/instances")["agents"].values():
        for r in call(agent, "GET", "/regions")["regions"]:
            if r["cached"] and not r["readers"]:
                call(agent, "DELETE", f"/regions/{r['id']}")


DEMO = ModelSpec(arch="llama", hidden=512, layers=8, heads=8, vocab=8192)  # ~128 MB float32


def demo_model() -> str:
    path = ROOT / ".cache" / "coldstart-demo"
    if not (path / "config.json").exists():
        make_model(path, DEMO)
    return str(path)


def _pool_imported(url: str, n: int) -> bool:
    pools = _get(url + "/admin/instances").get("warm_runtimes") or {}
    return bool(pools) and all(p["imported"] >= n for p in pools.values())


def cold_ttft(url: str, client, evict: bool, warm: int = 0) -> tuple[float, dict]:
    deadline = time.monotonic() + 120
    while (_instances(url) or (warm and not _pool_imported(url, warm))) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    if evict:
        _evict_host_caches(url)
    t0 = time.perf_counter()
    chunks = client.completions.create(model=MODEL, prompt="def main():", max_tokens=2,
                                       stream=True, temperature=0)
    ttft = None
    for chunk in chunks:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
    inst = max(_instances(url), key=lambda i: i["id"])
    return ttft, inst


def warm_overhead(url: str) -> float:
    return gateway_overhead_ms(url, MODEL, lambda: next(
        i for i in _instances(url) if i["state"] == "ready")["stages"][0]["url"])


def main() -> None:
    import openai

    from hydraserve.cli import DEFAULT_TTFT_SLO_S, _default_model
    from hydraserve.config import cluster_to_dict, default_local_cluster

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--exec-types", default=",".join(EXEC_TYPES))
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--default-setting", action="store_true",
                    help="the embedded default's model and cluster (see above)")
    ap.add_argument("--warm-runtime", type=int, default=0, metavar="N",
                    help="N warm runtimes per server for every execution type (see above)")
    ap.add_argument("--side-by-side", action="store_true",
                    help="with --warm-runtime: also run every execution type without the pool")
    args = ap.parse_args()
    nic, slo = NIC_GBPS, 7.5
    cluster = {"device": "cpu", "scale": {"size_scale": 100, "after_fetch_ms": 2000},
               "servers": [{"name": f"a10-{i}", "gpus": [24], "nic_gbps": NIC_GBPS,
                            "cache_gb": 32} for i in range(4)]}
    if args.default_setting:
        model, slo = _default_model(), DEFAULT_TTFT_SLO_S
        cfg = default_local_cluster()
        cluster, nic = cluster_to_dict(cfg), cfg.servers[0].nic_gbps
    else:
        model = demo_model()
    size_gb = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) * 100 / 1e9
    from hydraserve.store.checkpoint import scan_checkpoint
    from hydraserve.store.layout import StageLayout

    tensors = scan_checkpoint(Path(model))
    layout = StageLayout(tensors)

    def stage_floor(p: int) -> float:
        """The fetch of the largest stage image (a tied embedding is fetched by the first and
        the last stage, and layers are whole): what a split of p can reach at best."""
        largest = max(sum(tensors[n].nbytes for n in layout.tensor_names(s))
                      for s in layout.stages(p))
        return largest * 100 * 8 / 1e9 / nic
    res: dict = {}
    overhead = None
    with tempfile.TemporaryDirectory() as tmp:
        models = {"models": [{"name": MODEL, "path": model, "ttft_slo_s": slo}]}
        Path(tmp, "cluster.yaml").write_text(yaml.safe_dump(cluster))
        Path(tmp, "models.yaml").write_text(yaml.safe_dump(models))
        runs = [(et, w) for et in args.exec_types.split(",")
                for w in ([0, args.warm_runtime] if args.side_by_side and args.warm_runtime
                          else [args.warm_runtime])]
        for et, warm in runs:
            name, _, variant = et.partition(":")
            key = et + ("+warm" if warm and args.side_by_side else "")
            extra = ["--static-p", variant.removeprefix("static")] if variant else []
            gw = ServerProcess(["serve", "--cluster", f"{tmp}/cluster.yaml", "--models",
                                f"{tmp}/models.yaml", "--exec-type", name, "--port", "0",
                                "--keep-alive", "1", "--warm-runtime", str(warm), *extra],
                               Path(tmp) / f"{name}.log", timeout=300)
            try:
                client = openai.OpenAI(base_url=gw.url + "/v1", api_key="-", max_retries=0,
                                       timeout=300)
                trials = [cold_ttft(gw.url, client, evict=name == "serverlessllm", warm=warm)
                          for _ in range(args.trials)]
                p = trials[-1][1]["placement_p"]
                cached = name == "serverlessllm_with_cached_model"  # no fetch at all
                floor = 0.0 if cached else size_gb * 8 / (p * nic)
                sfloor = 0.0 if cached else stage_floor(p)
                ttft = statistics.median(t[0] for t in trials)
                res[key] = {"ttft_s": ttft, "trials": [round(t[0], 3) for t in trials], "p": p,
                            "floor_s": floor, "stage_floor_s": sfloor, "warm_runtimes": warm,
                            "to_floor": round(ttft / floor, 3) if floor else None,
                            "to_stage_floor": round(ttft / sfloor, 3) if sfloor else None,
                            "timeline": trials[-1][1].get("timeline")}
                if et == "hydraserve" and overhead is None:
                    overhead = warm_overhead(gw.url)
            finally:
                gw.stop()
            print(f"{key}: {res[key]}", file=sys.stderr)
    print(f"\n{Path(model).name}: {size_gb:.1f} GB (paper units), NIC {nic:g} Gbps per server, "
          f"TTFT SLO {slo:g} s; median of {args.trials} cold trials\n")
    print("floor = S / (p B); stage floor = the largest stage image / B")
    print(f"{'execution type':<34}{'p':>3}{'TTFT s':>9}{'floor s':>9}{'TTFT/floor':>12}"
          f"{'stage floor':>13}{'TTFT/stage':>12}")
    for et, r in res.items():
        ratio = f"{r['to_floor']:.2f}" if r["to_floor"] else "-"
        sratio = f"{r['to_stage_floor']:.2f}" if r["to_stage_floor"] else "-"
        print(f"{et:<34}{r['p']:>3}{r['ttft_s']:>9.2f}{r['floor_s']:>9.2f}{ratio:>12}"
              f"{r['stage_floor_s']:>13.2f}{sratio:>12}")
    for suffix in ("", "+warm"):
        base = "serverless_vllm" + suffix
        for h in ("hydraserve" + suffix, "hydraserve:static4" + suffix):
            if base in res and h in res:
                print(f"{h} vs {base}: {res[base]['ttft_s'] / res[h]['ttft_s']:.2f}x faster")
    if overhead is not None:
        print(f"gateway overhead on a warm 1-token request: {overhead:.2f} ms (median of 30)")
    if args.json:
        print(json.dumps({**res, "gateway_overhead_ms": overhead}))


if __name__ == "__main__":
    main()
