"""The Kubernetes backend, through the real `kubernetes` client.

No Kubernetes API server can run here, so these tests run against tests/kubefake.py: a fake API
server that speaks the part of the REST API the backend uses (resourceVersions, watches, 409,
410 Gone, deletion with a grace period, the API's Status bodies) and a kubelet that runs every
pod as a local process. What the fake does not model is listed in its docstring. The contract
suite in test_cluster_contract.py runs the same backend too; tests that need a real cluster
are in test_kubernetes_real.py (opt-in). Never does CI talk to a real API server.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from hydraserve.cluster import k8s_render as render
from hydraserve.cluster import kubernetes as kube
from hydraserve.cluster.base import WorkerSpec
from hydraserve.config import (ClusterConfig, ConfigError, KubernetesConfig, ScaleConfig,
                               ServerConfig, cluster_from_dict)
from hydraserve.make_model import ModelSpec, make_model
from hydraserve.store.launch import ServerProcess

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("kubernetes")

from kubefake import (FakeKubernetes, hydraserve_nodes, service_pods,  # noqa: E402
                      start_hydraserve)

ROOT = Path(__file__).resolve().parents[1]
SPEC = WorkerSpec(worker_id="Llama_2-7B.chat-12-r1", model="Llama_2-7B.chat", node="gpu-3",
                  rank=1, p=2, layers=(16, 32), all_card=True, num_kv_blocks=512,
                  device="cuda", dtype="float16", gpu_memory_gb=13.4)


def node(name: str, labels: dict, capacity: dict | None = None) -> dict:
    return {"metadata": {"name": name, "labels": labels},
            "status": {"capacity": capacity or {}}}


def test_servers_come_from_labelled_nodes():
    k = KubernetesConfig()
    nodes = [
        # NVIDIA feature discovery's memory label, in MiB
        node("a10-1", {"hydraserve.io/share": "1", "nvidia.com/gpu.memory": "23028",
                       "hydraserve.io/nic-gbps": "64", "hydraserve.io/cache-gb": "100"},
             {"nvidia.com/gpu": "4"}),
        # our own labels where feature discovery is absent
        node("cpu-0", {"hydraserve.io/share": "1", "hydraserve.io/gpus": "1",
                       "hydraserve.io/gpu-memory-gb": "24"}),
        node("plain", {}, {"nvidia.com/gpu": "8"}),  # not labelled: not a server
    ]
    servers, share = render.servers_from_nodes(nodes, k)
    assert share is True and [s.name for s in servers] == ["a10-1", "cpu-0"]
    assert servers[0].gpus == pytest.approx((23028 * 2**20 / 1e9,) * 4)
    assert (servers[0].nic_gbps, servers[0].cache_gb) == (64.0, 100.0)
    assert servers[1].gpus == (24.0,) and servers[1].nic_gbps == k.default_nic_gbps
    with pytest.raises(ConfigError, match="a10-9.*GPUs are unknown"):
        render.servers_from_nodes([node("a10-9", {"hydraserve.io/share": "0"})], k)
    with pytest.raises(ConfigError, match="disagree"):
        render.servers_from_nodes(nodes[:2] + [node("x", {"hydraserve.io/share": "0",
                                                        "hydraserve.io/gpus": "1",
                                                        "hydraserve.io/gpu-memory-gb": "8"})], k)
    assert render.servers_from_nodes(nodes[2:], k) == ((), None)


@pytest.mark.parametrize("share,engine,kcfg,claim", [
    (True, "hydraserve", KubernetesConfig(), {"aliyun.com/gpu-mem": "14"}),
    (False, "hydraserve", KubernetesConfig(), {"nvidia.com/gpu": "1"}),
    (True, "vllm", KubernetesConfig(share_resource="example.com/vram-gb", share_unit_gb=4.0),
     {"example.com/vram-gb": "4"}),
    (True, "hydraserve", KubernetesConfig(share_resource=None), None),
])
def test_worker_pods_are_valid_and_claim_their_gpu(share, engine, kcfg, claim):
    from hydraserve.cli import build_parser

    spec = dataclasses.replace(SPEC, engine=engine, vllm_python="/somewhere/python")
    pod = render.worker_pod(spec, kcfg, "http://10.0.0.7:8101", share, run="a1b2c3")
    kubernetes_validate.validate(pod, "1.33", strict=True)
    meta, c = pod["metadata"], pod["spec"]["containers"][0]
    assert meta["name"] == "hs-llama-2-7b-chat-12-r1-a1b2c3"
    assert meta["labels"][render.WORKER_ID] == "Llama_2-7B.chat-12-r1"
    assert meta["labels"][render.GATEWAY] == "hydraserve" and meta["labels"][render.RANK] == "1"
    assert pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchFields"] == [{"key": "metadata.name", "operator": "In", "values": ["gpu-3"]}]
    assert pod["spec"]["hostIPC"] and pod["spec"]["hostPID"]
    assert (c.get("resources") or {}).get("limits") == claim
    assert c["image"] == (kcfg.vllm_image if engine == "vllm" else kcfg.worker_image)
    # the arguments are a worker's command line, with the pod's address substituted
    args = [a.replace("$(POD_IP)", "10.0.0.9") for a in c["args"]]
    ns = build_parser().parse_args(args)
    assert (ns.host, ns.port, ns.stage_port, ns.agent) == ("10.0.0.9", 8200, 8201,
                                                           "http://10.0.0.7:8101")
    assert ns.layers == "16:32" and ns.all_card and ns.dtype == "float16"
    assert ns.vllm_python is None  # a vLLM image's own Python, never the gateway's


def test_pod_names_and_label_values_are_always_valid():
    for wid in ("a", "A" * 200, "m_1.x-0-r0", "--x--", "é-model-r0"):
        name = render.pod_name(wid, "abc123")
        assert len(name) <= 63 and name.startswith("hs-") and name.endswith("-abc123")
        assert all(ch.isalnum() and ch.islower() or ch.isdigit() or ch == "-" for ch in name)
        v = render.label_value(wid)
        assert 1 <= len(v) <= 63 and v[0].isalnum() and v[-1].isalnum()


def test_the_cluster_file_kubernetes_section():
    cfg = cluster_from_dict({"device": "cuda", "share": False, "kubernetes": {
        "namespace": "ml", "share_resource": None, "grace_period_s": 3}})
    assert cfg.servers == () and cfg.kubernetes.namespace == "ml"
    assert cfg.kubernetes.share_resource is None and cfg.kubernetes.grace_period_s == 3
    with pytest.raises(ConfigError, match="unknown key.*namspace"):
        cluster_from_dict({"kubernetes": {"namspace": "ml"}})
    with pytest.raises(ConfigError, match="no servers"):
        cluster_from_dict({"device": "cpu"})  # the local backend needs them


# -- against the fake API server ------------------------------------------------------------
CFG = ClusterConfig(servers=tuple(ServerConfig(f"n{i}", (24.0,), 16.0) for i in range(3)),
                    scale=ScaleConfig(size_scale=100.0),
                    kubernetes=KubernetesConfig(store_url=None, grace_period_s=5))


@pytest.fixture
def fake(tmp_path):
    f = FakeKubernetes(hydraserve_nodes(CFG), tmp_path / "pods").start()
    try:
        yield f
    finally:
        f.close()


def test_the_fake_speaks_the_api_errors_the_client_sees(fake, tmp_path):
    """The API behaviour the backend relies on, seen through the real client."""
    from kubernetes import client, watch
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(kube.api_client(str(fake.write_kubeconfig(tmp_path / "kc"))))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1", "labels": {"a": "b"}},
           "spec": {"restartPolicy": "Never", "nodeName": "n0", "containers": [
               {"name": "c", "image": "i", "command": ["sleep", "30"]}]}}
    core.create_namespaced_pod("hydraserve", pod)
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod("hydraserve", pod)
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "AlreadyExists"
    bad = {**pod, "metadata": {"name": "p2"}, "spec": {"containers": [{"name": "c",
                                                                       "imagee": "i"}]}}
    # the client refuses that one itself; sent raw, the server's schema check answers 422
    req = urllib.request.Request(fake.url + "/api/v1/namespaces/hydraserve/pods",
                                 data=json.dumps(bad).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=10)
    status = json.loads(raw.value.read())
    assert raw.value.code == 422 and status["reason"] == "Invalid" and "imagee" in status["message"]
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod("nope", "hydraserve")
    assert e.value.status == 404 and json.loads(e.value.body)["kind"] == "Status"
    seen = core.read_node("n0").metadata.resource_version
    core.patch_node("n0", {"metadata": {"resourceVersion": seen, "labels": {"x": "1"}}})
    with pytest.raises(ApiException) as e:  # a stale resourceVersion is a conflict
        core.patch_node("n0", {"metadata": {"resourceVersion": seen, "labels": {"x": "2"}}})
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "Conflict"
    assert core.read_node("n0").metadata.labels["x"] == "1"
    listed = core.list_namespaced_pod("hydraserve", label_selector="a=b")
    assert [p.metadata.name for p in listed.items] == ["p1"]
    # a watch from a compacted resourceVersion: the client raises 410 Gone
    fake.call(fake.compact)
    core.delete_namespaced_pod("p1", "hydraserve", grace_period_seconds=0)
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(core.list_namespaced_pod, "hydraserve",
                                      resource_version="1", timeout_seconds=5):
            pass
    assert e.value.status == 410


def test_the_watch_relists_after_410_and_orphans_are_deleted(fake, tmp_path, model_dirs,
                                                             monkeypatch):
    (tmp_path / "models").mkdir()
    start_hydraserve(fake, CFG, str(tmp_path / "models"))
    # a worker pod of a gateway that crashed, and one of another gateway
    for gw in ("hydraserve", "other"):
        pod = render.worker_pod(dataclasses.replace(SPEC, node="n0", device="cpu"),
                              dataclasses.replace(CFG.kubernetes, gateway_name=gw),
                              "http://127.0.0.1:9", True, run=gw)
        pod["spec"]["containers"][0]["command"] = ["sleep", "60"]
        pod["spec"]["containers"][0]["args"] = []
        fake.call(fake._create_pod, "hydraserve", pod)
    monkeypatch.setattr(kube.KubernetesCluster, "WATCH_TIMEOUT_S", 1)
    backend = kube.KubernetesCluster(CFG, kube.api_client(str(fake.write_kubeconfig(
        tmp_path / "kc"))))
    try:
        backend.start()
        names = lambda: sorted(p["metadata"]["name"] for p in fake.call(fake.pods)  # noqa: E731
                               if p["metadata"]["labels"].get(render.COMPONENT) == "worker"
                               and not p["metadata"].get("deletionTimestamp"))
        assert names() == [render.pod_name(SPEC.worker_id, "other")]
        assert sorted(backend.agent_urls()) == ["n0", "n1", "n2"]
        # compaction: the next watch gets 410 Gone; the backend lists again and sees an agent
        # that was replaced meanwhile (a new pod, a new address)
        fake.call(fake.compact)
        old = backend.agent_url("n1")
        fake.call(fake._delete_pod, "hydraserve", "hydraserve-agent-n1", 0)
        pods = [p for p in service_pods(CFG, str(tmp_path / "models"))
                if p["metadata"]["name"] == "hydraserve-agent-n1"]
        pods[0]["metadata"]["name"] = "hydraserve-agent-n1-b"
        pods[0]["spec"]["containers"][0]["env"].append(
            {"name": "STORE_URL", "value": backend.store_url()})
        fake.call(fake._create_pod, "hydraserve", pods[0])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if backend.agent_url("n1") != old:
                    break
            except Exception:  # noqa: BLE001 - between the two pods there is none
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the backend never saw the new agent")
    finally:
        backend.close()


@pytest.fixture(scope="module")
def kube_gateway(tmp_path_factory, model_dirs):
    """`hydraserve serve --cluster-backend kubernetes` against the fake cluster."""
    tmp = tmp_path_factory.mktemp("kgw")
    big = make_model(tmp / "big", ModelSpec(arch="llama", hidden=256, layers=4, vocab=2048,
                                            seed=9))
    (tmp / "volume").mkdir()
    for name, path in (("small", model_dirs["llama"]), ("pipe", str(big))):
        (tmp / "volume" / name).symlink_to(Path(path).resolve())
    fake = FakeKubernetes(hydraserve_nodes(CFG), tmp / "pods").start()
    server = None
    try:
        start_hydraserve(fake, CFG, str(tmp / "volume"))
        (tmp / "cluster.yaml").write_text(yaml.safe_dump({
            "device": "cpu", "scale": {"size_scale": 100, "after_fetch_ms": 2000},
            "kubernetes": {"store_url": None, "grace_period_s": 5}}))
        (tmp / "models.yaml").write_text(yaml.safe_dump({"models": [
            {"name": "small", "path": str(tmp / "volume" / "small"), "ttft_slo_s": 30},
            # p = 1 would miss the SLO: a two-stage pipeline with one all-card stage
            {"name": "pipe", "path": str(tmp / "volume" / "pipe"), "ttft_slo_s": 2.5}]}))
        server = ServerProcess(
            ["serve", "--cluster-backend", "kubernetes", "--cluster", str(tmp / "cluster.yaml"),
             "--models", str(tmp / "models.yaml"), "--port", "0", "--keep-alive", "3",
             "--kubeconfig", str(fake.write_kubeconfig(tmp / "kubeconfig"))],
            tmp / "gateway.log", timeout=120)
        yield server, fake
    finally:
        if server is not None:
            assert server.stop() == 0
        fake.close()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _admin(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def _worker_pods(fake) -> list[dict]:
    return [p for p in fake.call(fake.pods)
            if p["metadata"]["labels"].get(render.COMPONENT) == "worker"]


@pytest.mark.multiprocess
def test_a_cold_start_pipeline_consolidation_and_scale_to_zero_through_pods(kube_gateway):
    server, fake = kube_gateway
    body = {"model": "pipe", "prompt": "import os", "max_tokens": 120, "temperature": 0,
            "ignore_eos": True}
    cold = _post(server.url + "/v1/completions", body)
    assert cold["usage"]["completion_tokens"] == 120
    created = {}  # every worker pod the gateway created, from the API's event history
    for _, kind, event, obj in fake.call(lambda: list(fake.history)):
        if kind == "pods" and event == "ADDED" and \
                obj["metadata"]["labels"].get(render.COMPONENT) == "worker":
            created[obj["metadata"]["name"]] = obj
    assert sorted(p["metadata"]["labels"][render.RANK] for p in created.values()) == ["0", "1"]
    assert len({p["spec"]["nodeName"] for p in created.values()}) == 2  # two servers' NICs
    assert all(p["spec"]["containers"][0]["resources"]["limits"]["aliyun.com/gpu-mem"]
               for p in created.values())
    deadline = time.monotonic() + 60  # consolidation: the part-card stage's pod goes away
    while time.monotonic() < deadline:
        insts = [i for i in _admin(server.url, "/admin/instances")["instances"]
                 if i["model"] == "pipe"]
        if insts and insts[0]["consolidated"] and len(_worker_pods(fake)) == 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no consolidation: {insts}, {[p['metadata']['name'] for p in _worker_pods(fake)]}")
    warm = _post(server.url + "/v1/completions", body)  # the standalone worker: same tokens
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    deadline = time.monotonic() + 30  # keep-alive 3 s: scaled to zero, pods deleted
    while time.monotonic() < deadline and _worker_pods(fake):
        time.sleep(0.2)
    assert not _worker_pods(fake)
    again = _post(server.url + "/v1/completions", {**body, "model": "small", "max_tokens": 4})
    assert again["usage"]["completion_tokens"] == 4


@pytest.mark.multiprocess
def test_the_role_allows_exactly_what_the_backend_calls(kube_gateway):
    """Every (resource, verb) the gateway sent to the API is granted by the shipped Role, and
    the Role grants nothing it does not use (label_nodes.py's node patch aside)."""
    server, fake = kube_gateway
    _post(server.url + "/v1/completions", {"model": "small", "prompt": "x", "max_tokens": 2})
    used = {(res, verb) for verb, res in fake.calls}
    granted = set()
    for doc in yaml.safe_load_all((ROOT / "scripts/kubernetes/manifests/rbac.yaml").read_text()):
        if doc and doc["kind"] in ("Role", "ClusterRole"):
            for rule in doc["rules"]:
                granted |= {(r, v) for r in rule["resources"] for v in rule["verbs"]}
    assert used <= granted, used - granted
    assert used <= kube.VERBS, used - kube.VERBS  # VERBS lists every call the backend makes
    assert granted == kube.VERBS | {("nodes", "get"), ("nodes", "patch")}


@pytest.mark.multiprocess
def test_a_worker_pod_killed_mid_stream_the_stream_continues(kube_gateway):
    """The failover on the Kubernetes backend: the container of the pod serving a seeded stream
    dies (SIGKILL, as a crash or an OOM kill); the stream continues on a new pod from the
    tokens already sent, and its text is that of an uninterrupted run."""
    server, fake = kube_gateway
    body = {"model": "small", "prompt": "x y", "max_tokens": 200, "temperature": 0.9,
            "seed": 3, "ignore_eos": True}
    reference = _post(server.url + "/v1/completions", body)["choices"][0]["text"]
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text, chunks, killed = "", 0, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        text += event["choices"][0]["text"]
        chunks += 1
        if chunks == 3:
            pod = next(p for p in _worker_pods(fake)
                       if p["metadata"]["labels"][render.MODEL] == "small")
            killed = pod["metadata"]["name"]
            fake.kill_pod_process(pod["metadata"]["namespace"], killed)
    conn.close()
    assert killed and text == reference
    assert killed not in {p["metadata"]["name"] for p in _worker_pods(fake)}


def test_label_nodes_then_the_backend_reads_the_servers(tmp_path):
    """label_nodes.py (a real process, the real client, over HTTP) labels the fake cluster's
    nodes; the backend then finds exactly those servers and the sharing mode."""
    import os
    import subprocess
    import sys

    f = FakeKubernetes({"gpu-a": {"capacity": {"nvidia.com/gpu": "2"},
                                  "labels": {"nvidia.com/gpu.memory": "81559"}},
                        "gpu-b": {"capacity": {"nvidia.com/gpu": "1"},
                                  "labels": {"nvidia.com/gpu.memory": "81559"}},
                        "cpu-c": {"capacity": {"cpu": "8"}}}, tmp_path / "pods").start()
    try:
        kc = f.write_kubeconfig(tmp_path / "kc")
        run = subprocess.run([sys.executable, str(ROOT / "scripts/kubernetes/label_nodes.py"),
                              "--nic-gbps", "100", "--cache-gb", "64"],
                             env={**os.environ, "KUBECONFIG": str(kc), "SHARE": "0"},
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert ("patch", "nodes") in f.calls
        backend = kube.KubernetesCluster(ClusterConfig(servers=(), share=True),
                                         kube.api_client(str(kc)))
        servers = {s.name: s for s in backend.nodes()}
        assert sorted(servers) == ["gpu-a", "gpu-b"] and backend.share is False
        assert servers["gpu-a"].gpus == pytest.approx((81559 * 2**20 / 1e9,) * 2)
        assert (servers["gpu-b"].nic_gbps, servers["gpu-b"].cache_gb) == (100.0, 64.0)
    finally:
        f.close()
