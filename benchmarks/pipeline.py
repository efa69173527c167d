"""Pipeline benchmark: decode TPOT of p = 2 and 4 worker processes against one worker and against
the consolidated worker, how long consolidation takes, and the cold-start timeline of a p = 4
group whose fetch dominates, against the floor S / (4 B).

    python benchmarks/pipeline.py [--repeats 3] [--nic-gbps 0.1] [--json]

Every configuration runs real worker processes fed by real storage agents (this machine's
loopback); TPOT is measured by the client from the token stream of one request (64 new tokens
after a 32-token prompt), median of --repeats requests after a warm-up request.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import SPEC, ensure_model, machine  # noqa: E402
from hydraserve.cluster.pipeline import GroupConfig, LocalPipeline  # noqa: E402
from hydraserve.httpjson import call  # noqa: E402

PROMPT = [(i * 31) % 1000 + 10 for i in range(32)]
NEW = 64


def tpot_ms(pipe: LocalPipeline, url: str | None = None) -> float:
    from hydraserve.httpjson import stream

    stamps = []
    body = {"prompt_ids": PROMPT, "max_tokens": NEW + 1, "ignore_eos": True}
    for item in stream(url or pipe.head, "/generate", body):
        if "error" in item:
            raise RuntimeError(item["error"])
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000


def measure(pipe: LocalPipeline, repeats: int) -> float:
    tpot_ms(pipe)  # warm-up
    return statistics.median(tpot_ms(pipe) for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / ".cache" / "bench-llama-100m"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nic-gbps", type=float, default=0.1,
                    help="emulated NIC per server for the cold-start run (default 0.1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    model = ensure_model(Path(args.model_dir))
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    res: dict = {"model_bytes": size}

    with LocalPipeline(GroupConfig(str(model), p=1)) as pipe:
        res["tpot_ms_p1"] = measure(pipe, args.repeats)
    with LocalPipeline(GroupConfig(str(model), p=2)) as pipe:
        res["tpot_ms_p2"] = measure(pipe, args.repeats)
    with LocalPipeline(GroupConfig(str(model), p=4)) as pipe:
        res["tpot_ms_p4"] = measure(pipe, args.repeats)
        t0 = time.time()
        pipe.consolidate()
        while not pipe.health(0)["standalone"]:
            time.sleep(0.01)
        tl = pipe.health(0)["timeline"]
        res["consolidation_s"] = tl["consolidated"] - t0
        res["consolidation_rest_load_s"] = tl["rest_loaded"] - tl["consolidation_started"]
        res["tpot_ms_consolidated"] = measure(pipe, args.repeats)

    # cold start of a p = 4 group where the fetch dominates
    B = args.nic_gbps * 1e9 / 8
    with LocalPipeline(GroupConfig(str(model), p=4, nic_gbps=args.nic_gbps)) as pipe:
        t_req = pipe.stamps["prefetch_started"]
        call(pipe.head, "GET", "/health")
        first = None
        from hydraserve.httpjson import stream

        for item in stream(pipe.head, "/generate", {"prompt_ids": PROMPT, "max_tokens": 1}):
            first = first or time.time()
        timeline = pipe.timeline()
    res["p4_ttft_s"] = first - t_req
    res["p4_floor_s"] = size / (4 * B)
    res["p1_floor_s"] = size / B
    res["p4_timeline"] = timeline
    for p in (2, 4):
        res[f"tpot_ratio_p{p}"] = res[f"tpot_ms_p{p}"] / res["tpot_ms_p1"]
    res["tpot_ratio_consolidated"] = res["tpot_ms_consolidated"] / res["tpot_ms_p1"]

    print(f"\nmachine: {machine()}")
    print(f"model: llama {SPEC.hidden}x{SPEC.layers}, {size / 1e6:.0f} MB float32; TPOT over "
          f"{NEW} tokens after a {len(PROMPT)}-token prompt, median of {args.repeats}\n")
    print(f"{'configuration':<34}{'TPOT ms':>9}{'vs one worker':>15}")
    print(f"{'one worker (p = 1)':<34}{res['tpot_ms_p1']:>9.1f}{1.0:>15.2f}")
    for p in (2, 4):
        print(f"{f'pipeline p = {p}':<34}{res[f'tpot_ms_p{p}']:>9.1f}{res[f'tpot_ratio_p{p}']:>15.2f}")
    print(f"{'consolidated (from p = 4)':<34}{res['tpot_ms_consolidated']:>9.1f}"
          f"{res['tpot_ratio_consolidated']:>15.2f}")
    print(f"\nconsolidation: {res['consolidation_s']:.2f} s from the order to the switch "
          f"(rest of the model loaded in {res['consolidation_rest_load_s']:.2f} s)")
    print(f"cold start p = 4 at {args.nic_gbps} Gbps per server: first token "
          f"{res['p4_ttft_s']:.2f} s after the prefetch order; floor S/(4B) = "
          f"{res['p4_floor_s']:.2f} s (one server: S/B = {res['p1_floor_s']:.2f} s)")
    head = timeline.get("rank0", {})
    t_pf = timeline["group"]["prefetch_started"]
    print("  head timeline (s after the prefetch order): " + ", ".join(
        f"{k} {v - t_pf:.2f}" for k, v in sorted(head.items(), key=lambda kv: kv[1])))
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
