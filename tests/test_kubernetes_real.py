"""The cluster-backend contract on a real Kubernetes cluster (kind, k3s or a cloud): opt-in.

CI never talks to a real API server; these tests are skipped unless you give one:

    HYDRASERVE_TEST_KUBECONFIG=~/.kube/config        # the cluster (required)
    HYDRASERVE_TEST_CLUSTER=cluster.yaml             # its `kubernetes:` settings (optional;
                                                     # for a CPU cluster: device: cpu and
                                                     # gpu_resource/share_resource: null)
    HYDRASERVE_TEST_MODEL_DIR=/path/to/model         # a local copy of the model that the
                                                     # store's volume holds as `m`

with scripts/kubernetes/manifests applied, at least two nodes labelled by label_nodes.py, and
the worker image pullable. A small model is enough: `hydraserve make-model m --layers 4`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

from test_cluster_contract import spec, start, tokens

KUBECONFIG = os.environ.get("HYDRASERVE_TEST_KUBECONFIG")
pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(not KUBECONFIG, reason="opt-in: set HYDRASERVE_TEST_KUBECONFIG "
                                                        "(and see this file's docstring) to run "
                                                        "the contract on a real cluster")]


@pytest.fixture(scope="module")
def backend():
    from hydraserve.cluster.kubernetes import KubernetesCluster, api_client
    from hydraserve.config import ClusterConfig, KubernetesConfig, load_cluster

    path = os.environ.get("HYDRASERVE_TEST_CLUSTER")
    cfg = load_cluster(path) if path else ClusterConfig(servers=(), device="cpu")
    if cfg.kubernetes is None:
        cfg = dataclasses.replace(cfg, kubernetes=KubernetesConfig())
    b = KubernetesCluster(cfg, api_client(KUBECONFIG))
    if len(b.nodes()) < 2:
        pytest.skip("the contract needs two labelled nodes")
    b.start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def model_dir():
    path = os.environ.get("HYDRASERVE_TEST_MODEL_DIR")
    if not path:
        pytest.skip("set HYDRASERVE_TEST_MODEL_DIR to the model the store holds as `m`")
    return path


def test_layouts(backend):
    async def main():
        layers = await backend.layout("m", 2)
        assert len(layers) == 2 and layers[0][0] == 0 and layers[0][1] == layers[1][0]
        await backend.aclose()

    asyncio.run(main())


def test_a_whole_model_then_a_pipeline_that_consolidates(backend, model_dir):
    n0, n1 = (s.name for s in backend.nodes()[:2])

    async def main():
        device = backend.cluster_config().device
        full = dataclasses.replace(spec("real-full", n0, 0, 1, (0, 0), True, model_dir),
                                   device=device)
        full = dataclasses.replace(full, layers=(0, (await backend.layout("m", 1))[0][1]))
        (ref,) = await start(backend, [full])
        want = await tokens(ref)
        await backend.stop_worker("real-full")
        layers = await backend.layout("m", 2)
        specs = [dataclasses.replace(spec(f"real-p{r}", (n0, n1)[r], r, 2, layers[r], r == 0,
                                          model_dir), device=device) for r in range(2)]
        head, _ = await start(backend, specs)
        assert await tokens(head) == want
        await head.consolidate()
        h = await head.wait_for("consolidated", 120)
        assert h.has("consolidated") and h.standalone, h
        await backend.stop_worker("real-p1")
        assert await tokens(head) == want
        await backend.stop_worker("real-p0")
        await backend.aclose()

    asyncio.run(main())
