"""The load benchmark at a tiny size, so that the script cannot rot: a real `hydraserve serve`,
20 requests over cold models, one JSON object with every request accounted for."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"


def test_load_benchmark_runs_small():
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", "--requests", "20",
                          "--concurrency", "4", "--models", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["requests"] == 20
    assert res["answered"] + res["refused"] + res["error"] + res["lost"] == 20
    assert res["lost"] == 0 and res["answered"] > 0, res
    assert res["latency_ms"]["p50"] is not None and res["ttft_ms"]["p99"] is not None
    assert res["gateway_overhead_ms"] is not None
    assert "cores" in res["machine"]


def test_steady_benchmark_runs_small(model_dirs):
    """`load.py --steady` at a tiny size on a small model (no vLLM here): two rates, every
    request answered, the figures present."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--steady", "--json", "--rates", "2,4",
                          "--requests-per-rate", "4", "--model", model_dirs["llama"],
                          "--kv-cache-gb", "0.125"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rows = res["systems"]["hydraserve b8"]
    assert sorted(rows) == ["2.0", "4.0"]
    for r in rows.values():
        assert r["answered"] == r["sent"] == 4, r
        assert r["ttft_ms"]["p99"] is not None and r["tpot_ms"]["p50"] is not None
        assert r["tokens_per_s"] > 0
