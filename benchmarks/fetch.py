"""Fetch-path benchmark: how close cold-start fetches come to the emulated NIC, how much a p = 4
split gains, and whether loading hides behind the fetch.

    python benchmarks/fetch.py [--nic-gbps 0.8] [--repeats 3] [--json]

Starts a real remote store and four storage agents (one per emulated server, NIC limit each) as
processes on this machine, with a ~200 MB float16 Llama. Measured, medians of --repeats:
  - whole model on one node, vs its floor S / B;
  - a p = 4 split fetched on four nodes at once (order to last byte), vs S / (4 B);
  - prefetch order -> every tensor in the engine's parameters (streaming load), vs the fetch alone;
  - the unthrottled loopback rate (no NIC limit).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydraserve.make_model import ModelSpec, make_model  # noqa: E402
from hydraserve.store.image import ImageKind, ImageSpec  # noqa: E402
from hydraserve.store.launch import ServerProcess  # noqa: E402
from hydraserve.store.progressive import ProgressiveRegion, agent_call  # noqa: E402

SPEC = ModelSpec(arch="llama", hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048,
                 vocab=16384, dtype="float16", seed=0)
MODEL = "llama-200m"


def fetch(agent: str, spec: ImageSpec) -> dict:
    """Order a fetch, wait for its last byte, free the region; returns the region's report."""
    r = agent_call(agent, "POST", "/prefetch", spec.to_dict())
    done = agent_call(agent, "GET", f"/regions/{r['id']}?wait=1", timeout=600)
    agent_call(agent, "DELETE", f"/regions/{r['id']}")
    if done["state"] != "ready":
        raise RuntimeError(f"fetch failed: {done}")
    return done


def fetch_parallel(agents: list[str], specs: list[ImageSpec]) -> float:
    """Seconds from the first order to the last byte of all fetches, run at once."""
    out: list[dict] = [{}] * len(specs)

    def one(i: int) -> None:
        out[i] = fetch(agents[i], specs[i])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def streamed_load(agent: str, model_dir: Path) -> tuple[float, float]:
    """(seconds from the prefetch order to every tensor loaded, seconds of the fetch itself)."""
    from hydraserve.engine.config import EngineConfig, ModelConfig
    from hydraserve.engine.runner import StageRunner
    from hydraserve.engine.stream_load import iter_region
    from hydraserve.store.checkpoint import scan_checkpoint
    from hydraserve.store.layout import StageLayout

    layout = StageLayout(scan_checkpoint(model_dir))
    runner = StageRunner(ModelConfig.from_dir(model_dir), layout.stage(0, 1),
                         EngineConfig(dtype="float16", num_kv_blocks=1), 1, 1024)
    t0 = time.perf_counter()
    region = ProgressiveRegion.attach(agent, ImageSpec(MODEL, ImageKind.FULL))
    runner.load(iter_region(region))
    t_loaded = time.perf_counter() - t0
    report = agent_call(agent, "GET", f"/regions/{region.region_id}?wait=1")
    region.close()
    return t_loaded, report["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nic-gbps", type=float, default=0.8, help="per-node NIC (default 0.8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", default=str(ROOT / ".cache" / "bench-llama-200m-fp16"))
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        print(f"making benchmark model in {model_dir} ...", file=sys.stderr)
        make_model(model_dir, SPEC)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    B = args.nic_gbps * 1e9 / 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        (root / MODEL).symlink_to(model_dir.resolve())
        procs = [ServerProcess(["store", "serve", "--root", str(root)], Path(tmp) / "store.log")]
        try:
            store = procs[0].url
            nodes = []
            for i in range(4):
                procs.append(ServerProcess(["store", "agent", "--node", f"node{i}", "--remote", store,
                                            "--nic-gbps", str(args.nic_gbps)],
                                           Path(tmp) / f"agent{i}.log"))
                nodes.append(procs[-1].url)
            procs.append(ServerProcess(["store", "agent", "--node", "fast", "--remote", store],
                                       Path(tmp) / "fast.log"))
            fast = procs[-1].url
            full = ImageSpec(MODEL, ImageKind.FULL)
            fetch(nodes[0], full)  # warm the page cache and the store's image tables
            t_full = statistics.median(fetch(nodes[0], full)["seconds"] for _ in range(args.repeats))
            stages = [ImageSpec(MODEL, ImageKind.STAGE, 4, r) for r in range(4)]
            t_p4 = statistics.median(fetch_parallel(nodes, stages) for _ in range(args.repeats))
            runs = [streamed_load(nodes[1], model_dir) for _ in range(args.repeats)]
            t_load = statistics.median(r[0] for r in runs)
            t_fetch_during_load = statistics.median(r[1] for r in runs)
            loop_s = statistics.median(fetch(fast, full)["seconds"] for _ in range(args.repeats))
        finally:
            for p in reversed(procs):
                p.stop()
    res = {
        "model_bytes": size, "nic_gbps": args.nic_gbps,
        "full_fetch_s": t_full, "full_floor_s": size / B,
        "p4_fetch_s": t_p4, "p4_floor_s": size / (4 * B),
        "nic_efficiency": (size / t_full) / B,
        "p4_speedup": t_full / t_p4,
        "load_s": t_load, "fetch_alone_s": t_full,
        "overlap_ratio": t_load / t_full,
        "loopback_gbytes_per_s": size / loop_s / 1e9,
    }
    print(f"\nmodel: {size / 1e6:.0f} MB (float16 Llama); NIC {args.nic_gbps} Gbps per node; "
          f"medians of {args.repeats}")
    print(f"{'what':<46}{'seconds':>9}{'floor':>9}{'ratio':>8}")
    print(f"{'whole model, 1 node':<46}{t_full:>9.2f}{size / B:>9.2f}{t_full / (size / B):>8.2f}")
    print(f"{'p = 4 split, 4 nodes at once':<46}{t_p4:>9.2f}{size / 4 / B:>9.2f}"
          f"{t_p4 / (size / 4 / B):>8.2f}")
    print(f"{'prefetch -> all tensors loaded (1 node)':<46}{t_load:>9.2f}{t_full:>9.2f}"
          f"{t_load / t_full:>8.2f}")
    print(f"\nNIC efficiency {res['nic_efficiency']:.1%}; p = 4 speed-up {res['p4_speedup']:.2f}x; "
          f"overlap ratio {res['overlap_ratio']:.3f} (fetch alone inside the load run: "
          f"{t_fetch_during_load:.2f} s); unthrottled loopback {res['loopback_gbytes_per_s']:.2f} GB/s")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
