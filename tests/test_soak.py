"""Warm serving over many rounds (benchmarks/soak.py, shortened): in every worker mode --
standalone, pipeline head, consolidated -- concurrent streams, a third of them dropped by their
clients, end right and leave nothing behind: after every round the workers run nothing with every
KV block free, and no worker or agent holds more file descriptors or threads, nor /dev/shm more
segments, than after the first rounds."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.soak import leaks  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_leaks_names_what_grew():
    """The check can fail: a descriptor per dropped stream, a thread, a segment, a wrong end."""
    clean = {"streams": {"wrong": 0}, "growth": {
        "shm_segments": 0, "worker0": {"rss_mb": 9.0, "fds": 0, "threads": -1}}}
    assert leaks(clean) == []  # memory alone is reported, not called a leak (bounded caches)
    grown = {"streams": {"wrong": 2}, "growth": {
        "shm_segments": 1, "worker0": {"rss_mb": 0.0, "fds": 12, "threads": 0},
        "agent1": {"rss_mb": 0.0, "fds": 0, "threads": 1}}}
    assert leaks(grown) == ["2 stream(s) ended wrong", "1 more shared-memory segment(s)",
                            "worker0: +12 fds", "agent1: +1 threads"]


def test_every_worker_mode_serves_round_after_round_and_leaves_nothing_behind():
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--rounds",
                             "8", "--concurrency", "4", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:  # its pipelines stop their processes on SIGTERM
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    assert proc.returncode == 0, log[-3000:]
    result = json.loads(log.strip().splitlines()[-1])
    assert set(result["modes"]) == {"p1", "p2", "consolidated"}
    for mode, r in result["modes"].items():
        s = r["streams"]
        assert s["sent"] == 32 and s["wrong"] == 0, (mode, s)
        assert s["completed"] > 0 and s["dropped"] > 0, (mode, s)
        assert r["leaks"] == [], (mode, r["leaks"])
        workers = {k for k in r["last"] if k.startswith("worker")}
        # the consolidated head serves alone; the pipeline's stages all live
        assert len(workers) == {"p1": 1, "p2": 2, "consolidated": 1}[mode], (mode, workers)
