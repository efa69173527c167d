"""Load benchmark: many short requests over several cold models through one `hydraserve serve`.

    python benchmarks/load.py [--requests 1000] [--concurrency 32] [--models 4] [--seed 0] [--json]
    python benchmarks/load.py --steady [...]   (a warm model beside vLLM: benchmarks/steady.py)

Starts a real `hydraserve serve` (4 emulated servers with one 24 GB GPU and a 16 Gbps NIC each,
in the paper's units scaled by 1/100) serving `--models` small Llama models made with
`make-model`, all cold at the start. Sends `--requests` streamed completions through the openai
async client (no retries) with at most `--concurrency` in flight: for each, a seeded random
model, prompt and max_tokens in 8..16. Every request ends answered, refused with a clear status
(429 counts as refused), failed with a clear error, or lost (a timeout, a broken stream, or
still open at the global deadline). Reports latency and TTFT percentiles (cold starts
included), throughput, the counts, and the gateway's overhead on a warm 1-token request (the
same request through the gateway and straight to the instance head's /generate, interleaved).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import gateway_overhead_ms, machine  # noqa: E402
from hydraserve.make_model import ModelSpec, make_model  # noqa: E402
from hydraserve.store.launch import ServerProcess  # noqa: E402

PROMPTS = ["def main():", "The capital of France is", "Once upon a time", "SELECT * FROM",
           "import numpy as np", "Dear team,", "The quick brown fox", "1, 2, 3, 4,"]
REQUEST_TIMEOUT_S = 120.0  # one request; a cold start here takes a few seconds


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


async def one(client, model: str, prompt: str, max_tokens: int) -> dict:
    import openai

    t0 = time.perf_counter()
    ttft, finish, n = None, None, 0
    try:
        stream_ = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
            extra_body={"ignore_eos": True})
        async for chunk in stream_:
            if chunk.choices and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.choices and chunk.choices[0].text:
                n += 1
    except openai.RateLimitError as e:
        return {"outcome": "refused", "status": e.status_code}
    except openai.APIStatusError as e:
        return {"outcome": "error", "status": e.status_code, "error": str(e)[:200]}
    except (openai.APITimeoutError, openai.APIConnectionError) as e:
        return {"outcome": "lost", "error": f"{type(e).__name__}: {e}"[:200]}
    except openai.APIError as e:  # an SSE error event: a clear error
        return {"outcome": "error", "error": str(e)[:200]}
    if finish is None:
        return {"outcome": "lost", "error": "the stream ended without a finish reason"}
    return {"outcome": "answered", "latency": time.perf_counter() - t0, "ttft": ttft,
            "chunks": n}


async def run_load(url: str, models: list[str], requests: int, concurrency: int, seed: int,
                   deadline_s: float) -> tuple[list[dict], float]:
    import openai

    rng = random.Random(seed)
    plan = [(rng.choice(models), rng.choice(PROMPTS), rng.randint(8, 16)) for _ in range(requests)]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0,
                                timeout=REQUEST_TIMEOUT_S)
    sem = asyncio.Semaphore(concurrency)
    results: list[dict | None] = [None] * requests

    async def guarded(i: int) -> None:
        async with sem:
            results[i] = await one(client, *plan[i])

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(guarded(i)) for i in range(requests)]
    done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - t0
    await client.close()
    return [r or {"outcome": "lost", "error": "open at the global deadline"} for r in results], wall


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def warm_overhead(url: str, model: str) -> float | None:
    """Median ms the gateway adds to a warm 1-token request (see the module's docstring)."""
    def head() -> str | None:
        ready = [i for i in _get(url + "/admin/instances")["instances"]
                 if i["model"] == model and i["state"] == "ready"]
        return ready[0]["stages"][0]["url"] if ready else None

    return gateway_overhead_ms(url, model, head)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--steady" in argv:  # the warm model's steady state, beside vLLM: see steady.py
        from benchmarks.steady import main as steady

        return steady([a for a in argv if a != "--steady"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--models", type=int, default=4, help="cold models served (default: 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=900.0,
                    help="global deadline in seconds; requests still open then are lost")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hydraserve-load-") as tmp:
        tmp = Path(tmp)
        names = [f"load{i}" for i in range(args.models)]
        models = {"models": [
            {"name": n, "ttft_slo_s": 30,
             "path": str(make_model(tmp / n, ModelSpec(arch="llama", hidden=128, layers=4,
                                                       heads=4, kv_heads=2, vocab=2048,
                                                       seed=i)))}
            for i, n in enumerate(names)]}
        cluster = {"device": "cpu", "scale": {"size_scale": 100, "after_fetch_ms": 2000},
                   "servers": [{"name": f"s{i}", "gpus": [24], "nic_gbps": 16}
                               for i in range(4)]}
        (tmp / "models.yaml").write_text(yaml.safe_dump(models))
        (tmp / "cluster.yaml").write_text(yaml.safe_dump(cluster))
        server = ServerProcess(["serve", "--cluster", str(tmp / "cluster.yaml"), "--models",
                                str(tmp / "models.yaml"), "--port", "0",
                                "--shutdown-grace", "2"], tmp / "gateway.log")
        try:
            results, wall = asyncio.run(run_load(server.url, names, args.requests,
                                                 args.concurrency, args.seed, args.deadline))
            overhead = warm_overhead(server.url, names[0])
            cold_starts = sum(m["cold_starts"] for m in
                              _get(server.url + "/admin/instances")["models"].values())
        finally:
            code = server.stop()
    answered = [r for r in results if r["outcome"] == "answered"]
    lat = [r["latency"] for r in answered]
    ttft = [r["ttft"] for r in answered if r["ttft"] is not None]
    counts = {k: sum(r["outcome"] == k for r in results)
              for k in ("answered", "refused", "error", "lost")}
    ms = lambda x: None if x is None else round(x * 1000, 1)  # noqa: E731
    out = {
        "machine": machine(), "requests": args.requests, "concurrency": args.concurrency,
        "models": args.models, "seed": args.seed, **counts,
        "cold_starts": cold_starts, "wall_s": round(wall, 2),
        "throughput_rps": round(counts["answered"] / wall, 2) if wall else None,
        "latency_ms": {"p50": ms(_pct(lat, 50)), "p99": ms(_pct(lat, 99)),
                       "max": ms(max(lat) if lat else None)},
        "ttft_ms": {"p50": ms(_pct(ttft, 50)), "p99": ms(_pct(ttft, 99))},
        "gateway_overhead_ms": None if overhead is None else round(overhead, 2),
        "gateway_exit_code": code,
        "errors": sorted({r.get("error", "") for r in results
                          if r["outcome"] in ("error", "lost")})[:5],
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"machine: {out['machine']}")
        print(f"{args.requests} requests over {args.models} cold models, concurrency "
              f"{args.concurrency}, seed {args.seed}: {counts['answered']} answered, "
              f"{counts['refused']} refused (429), {counts['error']} clear errors, "
              f"{counts['lost']} lost; {cold_starts} cold starts")
        print(f"latency p50 {out['latency_ms']['p50']} ms, p99 {out['latency_ms']['p99']} ms; "
              f"TTFT p50 {out['ttft_ms']['p50']} ms, p99 {out['ttft_ms']['p99']} ms; "
              f"{out['throughput_rps']} requests/s over {out['wall_s']} s")
        print(f"gateway overhead on a warm 1-token request: {out['gateway_overhead_ms']} ms "
              "(median of 30)")
    return 0 if counts["lost"] == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
