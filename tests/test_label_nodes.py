"""label_nodes.py on the local backend (the Kubernetes path needs an API server: not here)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydraserve.config import load_cluster

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kubernetes" / "label_nodes.py"


def _run(share: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SHARE"}
    if share is not None:
        env["SHARE"] = share
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True)


def test_local_isolation_mode(tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text("device: cpu\nservers:\n  - {name: a, gpus: [24], nic_gbps: 16}\n")
    assert load_cluster(f).share is True
    assert _run("0", "--local", str(f)).returncode == 0
    assert load_cluster(f).share is False
    assert _run("1", "--local", str(f)).returncode == 0
    assert load_cluster(f).share is True and load_cluster(f).servers[0].name == "a"
    for bad in (None, "2"):
        r = _run(bad, "--local", str(f))
        assert r.returncode == 2 and "SHARE" in r.stderr
