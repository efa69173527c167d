"""A warm engine's memory stays bounded while prompt lengths vary (float32 on CPU, packed Linears).

Every new input shape of a packed Linear used to leave a compiled kernel and its buffers in
oneDNN's and ideep's caches, 1,024 entries each by default: a worker serving varied prompt lengths
grew by hundreds of MB. The engine bounds both caches (`layers.bound_onednn_caches`). Each case
runs in a process of its own, since the caches read their size once per process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hydraserve.make_model import ModelSpec, make_model

pytestmark = pytest.mark.slow

PROBE = r"""
import json, os, sys
from hydraserve.engine.config import EngineConfig
from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.sequence import SamplingParams

def rss_mb():
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

engine = LLMEngine(sys.argv[1], EngineConfig(kv_cache_mb=8))
one = SamplingParams(max_tokens=2, ignore_eos=True)
for n in range(3, 43):  # 40 lengths: a bounded cache is full after these
    engine.generate([[5 + i % 900 for i in range(n)]], one)
warm = rss_mb()
for n in range(43, 163):  # 120 lengths not seen before
    engine.generate([[5 + i % 900 for i in range(n)]], one)
print(json.dumps({"warm": warm, "grew": rss_mb() - warm,
                  "caps": [os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                           os.environ.get("LRU_CACHE_CAPACITY")]}))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_model(tmp_path_factory.mktemp("mem") / "m",
                          ModelSpec(arch="llama", hidden=128, layers=4, vocab=1024, seed=3)))


def _probe(model: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", PROBE, model], env={**clean, **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_new_prompt_lengths_do_not_grow_a_warm_engine(model):
    r = _probe(model)
    assert r["caps"] == ["64", "64"]
    assert r["grew"] < 20, r  # 120 new lengths; measured here: ~6 MB


def test_the_operators_own_cache_size_is_kept_and_unbounded_caches_grow(model):
    """The check can fail: with the library default (1,024 entries each) the same lengths grow
    the process by far more (measured here: ~270 MB)."""
    r = _probe(model, ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    assert r["caps"] == ["1024", "1024"]
    assert r["grew"] > 60, r
