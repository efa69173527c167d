"""Measure the real vLLM (offline ``LLM`` API) on a model: prefill and decode TPOT.

Run by ``benchmarks/engine.py`` with a Python that has vLLM installed; prints one JSON line.
Not imported by the package or the tests.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    # no prefix caching: the benchmark repeats prompts, and a cache hit would skip the prefill
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, seed=0,
              enable_prefix_caching=False)

    def run(prompts: list[list[int]], n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t

    prompt = [(i * 7919) % 1000 + 10 for i in range(args.prompt_len)]
    run([prompt], 1)  # warm-up
    prefill = statistics.median(run([prompt], 1) for _ in range(args.repeats))
    out = {"prefill_s": prefill, "prefill_tok_s": args.prompt_len / prefill, "tpot_ms": {}}
    for b in (int(x) for x in args.batches.split(",")):
        prompts = [[(i * 31 + j * 7) % 1000 + 10 for i in range(args.decode_prompt_len)]
                   for j in range(b)]
        run(prompts, args.new_tokens)  # warm-up
        tpots = []
        for _ in range(args.repeats):
            t1 = run(prompts, 1)
            tn = run(prompts, args.new_tokens + 1)
            tpots.append((tn - t1) / args.new_tokens * 1000)
        out["tpot_ms"][str(b)] = statistics.median(tpots)
    print("VLLM_RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
