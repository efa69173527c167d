"""What the control plane reads of a backend besides its workers: each node's GPU budgets, the
warm runtime pool and a registered model's size, the same on every backend (the local one, the
Kubernetes one against tests/kubefake.py's API server, the simulator's). None of them needs the
cluster's services, so no backend is started here."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hydraserve.config import ClusterConfig, KubernetesConfig, ScaleConfig, ServerConfig

CFG = ClusterConfig(servers=(ServerConfig("n0", (24.0, 24.0), 16.0),
                             ServerConfig("n1", (16.0,), 16.0)),
                    scale=ScaleConfig(size_scale=100.0))
SIM_SIZE_GB = 1.6  # the simulator's model shape: it has no weights on disk


def local(tmp_path: Path):
    from hydraserve.cluster.local import LocalCluster

    return LocalCluster(CFG), lambda: None


def kubernetes(tmp_path: Path):
    """The backend on a fake API server's labelled nodes (see tests/kubefake.py)."""
    pytest.importorskip("kubernetes")
    from kubefake import FakeKubernetes, hydraserve_nodes

    from hydraserve.cluster.kubernetes import KubernetesCluster, api_client

    fake = FakeKubernetes(hydraserve_nodes(CFG), tmp_path / "pods").start()
    try:
        client = api_client(str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        backend = KubernetesCluster(dataclasses.replace(CFG, kubernetes=KubernetesConfig()),
                                    client)
    except BaseException:
        fake.close()
        raise
    return backend, fake.close


def sim(tmp_path: Path):
    from hydraserve.sim.cluster import SimCluster
    from hydraserve.sim.costmodel import CostModel, ModelShape

    return SimCluster(CFG, {"m": ModelShape("m", SIM_SIZE_GB, 4)}, CostModel.local_cpu()), \
        lambda: None


@pytest.mark.parametrize("make", [local, kubernetes, sim])
def test_budgets_pool_and_model_size(make, tmp_path, model_dirs):
    backend, after = make(tmp_path)
    try:
        backend.register_model("m", model_dirs["llama"])
        budgets = backend.gpu_budgets()
        assert sorted(budgets) == ["n0", "n1"]
        for s in CFG.servers:  # nothing held: the configured GPUs (the fake's labels in MiB)
            assert budgets[s.name] == pytest.approx(list(s.gpus), rel=1e-4)
        pool = backend.warm_pool()
        assert set(pool) <= {"n0", "n1"}
        assert all(counts == {"idle": 0, "imported": 0} for counts in pool.values())
        weights = sum(f.stat().st_size for f in Path(model_dirs["llama"]).glob("*.safetensors"))
        want = SIM_SIZE_GB if make is sim else weights * CFG.scale.size_scale / 1e9
        assert weights and backend.model_size_gb("m") == pytest.approx(want)
    finally:
        try:
            backend.close()
        finally:
            after()


def test_warm_runtimes_hold_gpu_memory_on_cuda_only():
    """A pooled runtime's CUDA context stays on its server's first GPU: the control plane may
    not claim it. On CPU a runtime holds host memory only."""
    from hydraserve.cluster.local import RUNTIME_CONTEXT_GB, LocalCluster

    cuda = dataclasses.replace(CFG, device="cuda", warm_runtimes=2,
                               scale=ScaleConfig(size_scale=10.0))
    context = RUNTIME_CONTEXT_GB * 10.0  # one runtime's, in the cluster's GB
    for cfg, held in [(cuda, 2 * context), (dataclasses.replace(cuda, device="cpu"), 0.0),
                      (dataclasses.replace(cuda, warm_runtimes=0), 0.0),
                      (dataclasses.replace(cuda, warm_runtimes=100), 100 * context)]:
        cluster = LocalCluster(cfg)
        try:
            budgets = cluster.gpu_budgets()
        finally:
            cluster.close()
        assert budgets == {"n0": [max(0.0, 24.0 - held), 24.0], "n1": [max(0.0, 16.0 - held)]}
