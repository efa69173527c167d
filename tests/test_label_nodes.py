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


# --- the Kubernetes path, against a fake CoreV1Api (no API server here) ---------------------

def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("label_nodes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeCoreV1:
    """list_node, read_node and patch_node: all the hydraserve-nodes ClusterRole allows."""

    def __init__(self, nodes: dict[str, dict]):
        from types import SimpleNamespace as NS

        self.calls: list[tuple] = []
        self.nodes = {name: NS(metadata=NS(name=name, labels=dict(d.get("labels", {}))),
                               status=NS(capacity=dict(d.get("capacity", {}))))
                      for name, d in nodes.items()}

    def list_node(self):
        from types import SimpleNamespace as NS

        self.calls.append(("list_node",))
        return NS(items=list(self.nodes.values()))

    def read_node(self, name):
        self.calls.append(("read_node", name))
        if name not in self.nodes:
            raise LookupError("Not Found")
        return self.nodes[name]

    def patch_node(self, name, body):
        self.calls.append(("patch_node", name, body))
        self.nodes[name].metadata.labels.update(body["metadata"]["labels"])


CLUSTER = {
    "gpu-a": {"capacity": {"nvidia.com/gpu": "4", "cpu": "64"},
              "labels": {"nvidia.com/gpu.memory": "24576"}},
    "gpu-b": {"capacity": {"nvidia.com/gpu": "2"}},  # no GPU feature discovery
    "cpu-c": {"capacity": {"cpu": "16"}},
}


def test_kubernetes_default_labels_gpu_nodes(capsys):
    mod = _module()
    api = FakeCoreV1(CLUSTER)
    labels = mod.node_labels(True, nic_gbps=16, cache_gb=128)
    assert labels == {"hydraserve.io/share": "1", "hydraserve.io/nic-gbps": "16",
                      "hydraserve.io/cache-gb": "128"}
    assert mod.label_kubernetes(api, labels) == 0
    assert {c[0] for c in api.calls} == {"list_node", "patch_node"}
    assert [c[1] for c in api.calls if c[0] == "patch_node"] == ["gpu-a", "gpu-b"]
    assert api.nodes["gpu-a"].metadata.labels["hydraserve.io/nic-gbps"] == "16"
    assert "hydraserve.io/share" not in api.nodes["cpu-c"].metadata.labels
    err = capsys.readouterr().err
    assert "gpu-b has no nvidia.com/gpu.memory" in err and "gpu-a" not in err


def test_kubernetes_explicit_nodes_without_gpus():
    mod = _module()
    api = FakeCoreV1(CLUSTER)
    labels = mod.node_labels(False, gpus=1, gpu_memory_gb=24)
    assert mod.label_kubernetes(api, labels, ["cpu-c"]) == 0
    assert api.calls == [("read_node", "cpu-c"),
                         ("patch_node", "cpu-c", {"metadata": {"labels": {
                             "hydraserve.io/share": "0", "hydraserve.io/gpus": "1",
                             "hydraserve.io/gpu-memory-gb": "24"}}})]
    assert mod.label_kubernetes(api, labels, ["cpu-c", "nope"]) == 1  # nothing patched
    assert [c for c in api.calls if c[0] == "patch_node"][1:] == []


def test_kubernetes_no_gpu_nodes(capsys):
    mod = _module()
    api = FakeCoreV1({"cpu-c": CLUSTER["cpu-c"]})
    assert mod.label_kubernetes(api, mod.node_labels(True)) == 1
    assert "--nodes" in capsys.readouterr().err
    assert [c[0] for c in api.calls] == ["list_node"]


def test_main_with_fake_api(monkeypatch):
    mod = _module()
    api = FakeCoreV1(CLUSTER)
    monkeypatch.setattr(mod, "_core_api", lambda: api)
    monkeypatch.setenv("SHARE", "1")
    assert mod.main(["--nodes", "gpu-b, cpu-c", "--nic-gbps", "25", "--cache-gb", "0.5",
                     "--gpus", "2", "--gpu-memory-gb", "79.5"]) == 0
    for name in ("gpu-b", "cpu-c"):
        assert {k: v for k, v in api.nodes[name].metadata.labels.items()
                if k.startswith("hydraserve.io/")} == {
            "hydraserve.io/share": "1", "hydraserve.io/nic-gbps": "25",
            "hydraserve.io/cache-gb": "0.5", "hydraserve.io/gpus": "2",
            "hydraserve.io/gpu-memory-gb": "79.5"}
    assert "hydraserve.io/share" not in api.nodes["gpu-a"].metadata.labels


def test_label_values():
    mod = _module()
    assert [mod.label_value(x) for x in (16, 0.5, 1e6, 0, 12.25)] == [
        "16", "0.5", "1000000", "0", "12.25"]


def test_usage_errors(tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text("device: cpu\nservers:\n  - {name: a, gpus: [24], nic_gbps: 16}\n")
    for args in (["--gpus", "1"], ["--gpu-memory-gb", "24"], ["--nic-gbps", "-1"],
                 ["--nic-gbps", "fast"], ["--nodes", ","], ["--local", str(f), "--nic-gbps", "16"]):
        r = _run("1", *args)
        assert r.returncode == 2, (args, r.stderr)
    assert load_cluster(f).share is True  # untouched by the refused --local call
