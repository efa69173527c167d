"""The end-to-end experiment's scripts: the configs start_server.sh 1 serves (the scaled hybrid
testbed, model set 3 with each application's SLOs), the run folders, and clear usage errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hydraserve.config import load_cluster, load_models

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "ae_scripts" / "run_end2end_expr.py"


def runner(*args: str) -> str:
    out = subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_configs_of_the_hybrid_testbed_and_model_set_3(tmp_path):
    runner("--write-configs", str(tmp_path / "c"), "--exec-types", "serverlessllm",
           "--per-app", "1", "--models-dir", str(tmp_path / "models"))
    cluster = load_cluster(tmp_path / "c" / "cluster.yaml")
    assert [s.name for s in cluster.servers] == ["a10-0", "a10-1"] + [f"v100-{i}" for i in range(4)]
    assert [s.nic_gbps for s in cluster.servers] == [64.0] * 2 + [16.0] * 4
    assert cluster.servers[0].gpus == (22.0,) * 4 and cluster.servers[2].gpus == (32.0,) * 4
    assert cluster.egress_gbps == 192.0 and cluster.scale.size_scale == 100
    assert not cluster.share  # ServerlessLLM: exclusive GPUs
    models = {m.name: m for m in load_models(tmp_path / "c" / "models.yaml")}
    assert list(models) == ["Llama2-13B-0", "Llama2-7B-0", "Llama2-13B-1", "Llama2-7B-1",
                            "Llama2-13B-2", "Llama2-7B-2"]
    assert (models["Llama2-13B-0"].ttft_slo_s, models["Llama2-13B-0"].tpot_slo_ms) == (12, 200)
    assert (models["Llama2-7B-1"].ttft_slo_s, models["Llama2-7B-1"].tpot_slo_ms) == (7.5, 84)
    assert models["Llama2-13B-2"].ttft_slo_s == 60 and models["Llama2-13B-2"].size_gb == 25
    assert all(Path(m.path, "config.json").exists() for m in models.values())
    shared = yaml.safe_load(runner("--write-configs", str(tmp_path / "d"), "--exec-types",
                                   "hydraserve", "--per-app", "1", "--models-dir",
                                   str(tmp_path / "models")) or "null")
    assert shared is None and load_cluster(tmp_path / "d" / "cluster.yaml").share


def test_run_folders():
    assert runner("--run-dir", "--exec-types", "hydraserve", "--cv", "8", "--rate", "0.6",
                  "--out", "r").strip() == "r/hydraserve-cv8-rate0.6"


@pytest.mark.parametrize("script,args", [
    ("end2end.sh", []), ("end2end.sh", ["hydraserve", "8"]),
    ("end2end.sh", ["hydraserve", "8", "0.6", "--fast"]),
    ("start_server.sh", ["1", "hydraserve", "0", "hybrid", "8", "0.6"]),
    ("start_server.sh", ["1", "hydraserve", "3", "a10", "8", "0.6"]),
    ("start_server.sh", ["2", "hydraserve", "3", "hybrid", "8", "0.6"]),
])
def test_usage_errors(script, args):
    out = subprocess.run(["bash", str(ROOT / "ae_scripts" / script), *args],
                         capture_output=True, text=True, timeout=60)
    said = (out.stderr + out.stdout).lower()
    assert out.returncode == 2 and ("usage" in said or "choose" in said), said
