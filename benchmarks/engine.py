"""Engine benchmark: prefill tokens/s and decode TPOT at batch 1 and 8 on a ~100M-parameter
Llama, side by side with the real vLLM when a Python with vLLM is available.

    python benchmarks/engine.py [--model DIR] [--vllm-python PATH] [--repeats 5] [--json]

--model DIR: any Hugging Face directory (e.g. the default model, converted by `hydraserve
serve` into ~/.cache/hydraserve/smollm2-135m-instruct); both engines compute in float32.

Seeded, warmed up, medians of --repeats runs; our engine and vLLM run one after the other on the
same model in the same invocation, so the ratio is what to read (absolute times on a shared
machine drift). Also checks that the KV budget is honoured: more sequences than fit wait (or are
preempted and recomputed) instead of over-allocating.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_name  # noqa: E402
from hydraserve.make_model import ModelSpec, make_model  # noqa: E402
from hydraserve.worker.vllm_worker import find_vllm_python  # noqa: E402

SPEC = ModelSpec(arch="llama", hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048,
                 vocab=16384, seed=0)


def machine() -> str:
    import torch

    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{platform.python_version()}")


def ensure_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        print(f"making benchmark model in {path} ...", file=sys.stderr)
        make_model(path, SPEC)
    return path


def bench_ours(model: Path, repeats: int, prompt_len: int, decode_prompt_len: int,
               new_tokens: int, batches: list[int]) -> dict:
    import torch

    from hydraserve.engine.config import EngineConfig
    from hydraserve.engine.engine import LLMEngine
    from hydraserve.engine.sequence import SamplingParams

    torch.manual_seed(0)
    engine = LLMEngine(model, EngineConfig(max_model_len=1024))
    nparams = sum(math.prod(t.shape) for t in engine.layout.tensors.values())

    def run(prompts: list[list[int]], n: int) -> list[float]:
        """Step end times; the first step is the prefill."""
        params = SamplingParams(max_tokens=n, ignore_eos=True)
        for p in prompts:
            engine.add_request(p, params)
        t0, stamps = time.perf_counter(), []
        while engine.scheduler.has_unfinished():
            engine.step()
            stamps.append(time.perf_counter() - t0)
        return stamps

    prompt = [(i * 7919) % 1000 + 10 for i in range(prompt_len)]
    run([prompt], 1)
    prefill = statistics.median(run([prompt], 1)[0] for _ in range(repeats))
    out = {"params_m": nparams / 1e6, "prefill_s": prefill, "prefill_tok_s": prompt_len / prefill,
           "tpot_ms": {}}
    for b in batches:
        prompts = [[(i * 31 + j * 7) % 1000 + 10 for i in range(decode_prompt_len)]
                   for j in range(b)]
        run(prompts, 8)
        tpots = []
        for _ in range(repeats):
            stamps = run(prompts, new_tokens + 1)
            tpots.append((stamps[-1] - stamps[0]) / new_tokens * 1000)
        out["tpot_ms"][str(b)] = statistics.median(tpots)
    return out


def bench_kv_budget(model: Path) -> dict:
    """16 sequences of 32 + 64 tokens against a cache that holds ~3 of them at once."""
    from hydraserve.engine.config import EngineConfig
    from hydraserve.engine.engine import LLMEngine
    from hydraserve.engine.sequence import SamplingParams

    blocks = 18
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=blocks, block_size=16, max_model_len=1024))
    prompts = [[(i * 13 + j) % 1000 + 10 for i in range(32)] for j in range(16)]
    t = time.perf_counter()
    res = engine.generate(prompts, SamplingParams(max_tokens=64, ignore_eos=True))
    s = engine.scheduler
    return {"kv_blocks": blocks, "peak_blocks_used": s.peak_blocks_used,
            "preemptions": s.num_preemptions, "all_finished": all(len(r.token_ids) == 64 for r in res),
            "seconds": time.perf_counter() - t}


def bench_vllm(py: str, model: Path, repeats: int, prompt_len: int, decode_prompt_len: int,
               new_tokens: int, batches: list[int]) -> dict | None:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    cmd = [py, str(ROOT / "benchmarks" / "vllm_peer.py"), "--model", str(model),
           "--repeats", str(repeats), "--prompt-len", str(prompt_len),
           "--decode-prompt-len", str(decode_prompt_len), "--new-tokens", str(new_tokens),
           "--batches", ",".join(map(str, batches))]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        print("vLLM run failed:\n" + r.stderr[-3000:], file=sys.stderr)
        return None
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("VLLM_RESULT ")]
    if not lines:
        print("vLLM printed no result:\n" + r.stdout[-2000:] + r.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(lines[-1].split(" ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, metavar="DIR",
                    help="a Hugging Face model directory to measure (default: a ~100M Llama "
                         "made once in --model-dir)")
    ap.add_argument("--model-dir", default=str(ROOT / ".cache" / "bench-llama-100m"))
    ap.add_argument("--vllm-python", default=None,
                    help="a Python with vLLM installed (default: HYDRASERVE_VLLM_PYTHON, this "
                         "one, then /opt/vllm-venv)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    batches = [1, 8]
    model = Path(args.model) if args.model else ensure_model(Path(args.model_dir))
    common = dict(repeats=args.repeats, prompt_len=args.prompt_len,
                  decode_prompt_len=args.decode_prompt_len, new_tokens=args.new_tokens,
                  batches=batches)
    ours = bench_ours(model, **common)
    kv = bench_kv_budget(model)
    peer = None
    py = None if args.no_vllm else find_vllm_python(
        args.vllm_python or os.environ.get("HYDRASERVE_VLLM_PYTHON"))
    if py:
        peer = bench_vllm(py, model, **common)
    print(f"\nmachine: {machine()}")
    cfg = json.loads((model / "config.json").read_text())
    print(f"model: {model.name}: {cfg.get('model_type')} {cfg['hidden_size']}x"
          f"{cfg['num_hidden_layers']} ({ours['params_m']:.0f}M params, computed in float32); "
          f"medians of {args.repeats}; prefill {args.prompt_len} tokens, decode {args.new_tokens} "
          f"tokens after {args.decode_prompt_len}-token prompts\n")
    rows = [("prefill tokens/s", ours["prefill_tok_s"], peer and peer["prefill_tok_s"])]
    for b in batches:
        rows.append((f"decode TPOT ms, batch {b}", ours["tpot_ms"][str(b)],
                     peer and peer["tpot_ms"][str(b)]))
    print(f"{'metric':<26}{'hydraserve':>12}{'vLLM':>12}{'ours/vLLM':>11}")
    for name, a, b in rows:
        print(f"{name:<26}{a:>12.1f}" + (f"{b:>12.1f}{a / b:>11.2f}" if b else f"{'-':>12}{'-':>11}"))
    print(f"\nKV budget: {kv['kv_blocks']} blocks; peak used {kv['peak_blocks_used']}; "
          f"{kv['preemptions']} preemptions; all 16 sequences finished: {kv['all_finished']} "
          f"({kv['seconds']:.1f} s)")
    if args.json:
        print(json.dumps({"model": model.name, "ours": ours, "vllm": peer, "kv_budget": kv,
                          "machine": machine()}))


if __name__ == "__main__":
    main()
