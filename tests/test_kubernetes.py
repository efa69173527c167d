"""The Kubernetes backend, through the real `kubernetes` client.

No Kubernetes API server can run here, so these tests run against tests/kubefake.py: a fake API
server that speaks the part of the REST API the backend uses (resourceVersions, watches, 409,
410 Gone, deletion with a grace period, the API's Status bodies) and a kubelet that runs every
pod as a local process. What the fake does not model is listed in its docstring. The contract
suite in test_cluster_contract.py runs the same backend too; tests that need a real cluster
are in test_kubernetes_real.py (opt-in). Never does CI talk to a real API server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import threading
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
                  instance="Llama_2-7B.chat-12", gpu=2, claim_gb=6.7,
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
    pod = render.worker_pod(spec, kcfg, "http://10.0.0.7:8101", share, run="a1b2c3",
                            orphan_grace=45.0)
    kubernetes_validate.validate(pod, "1.33", strict=True)
    meta, c = pod["metadata"], pod["spec"]["containers"][0]
    assert meta["name"] == "hs-llama-2-7b-chat-12-r1-a1b2c3"
    assert meta["labels"][render.WORKER_ID] == "Llama_2-7B.chat-12-r1"
    assert meta["labels"][render.INSTANCE] == "Llama_2-7B.chat-12"
    # the pod is its own record: the spec it runs, read back whole
    assert render.pod_spec(pod) == (dataclasses.replace(spec, vllm_python=None)
                                    if engine == "vllm" else spec)
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
    assert (ns.orphan_grace, ns.lease) == (45.0, None)  # an in-memory lease: POST /lease
    assert (ns.instance, ns.gpu, ns.claim_gb) == ("Llama_2-7B.chat-12", 2, 6.7)


def test_which_worker_pods_a_gateway_adopts():
    """Adopted: Ready, at an address, not being deleted, with a readable spec; anything else
    is deleted by the gateway that starts."""
    pod = render.worker_pod(SPEC, KubernetesConfig(), "http://10.0.0.7:8101", True)
    ready = {"phase": "Running", "podIP": "10.0.0.9",
             "conditions": [{"type": "Ready", "status": "True"}]}
    ok = {**pod, "status": ready}
    assert render.unadoptable(ok) is None and render.pod_spec(ok) == SPEC
    cases = [  # (the pod, what the reason says)
        ({**pod, "status": {"phase": "Pending"}}, "Pending and not Ready"),
        ({**pod, "status": {**ready, "conditions": [{"type": "Ready", "status": "False"}]}},
         "Running and not Ready"),
        ({**pod, "status": {**ready, "phase": "Failed"}}, "Failed"),
        ({**pod, "status": {**ready, "phase": "Succeeded"}}, "Succeeded"),
        ({**ok, "metadata": {**pod["metadata"], "deletionTimestamp": "2025-01-01T00:00:00Z"}},
         "being deleted"),
        ({**ok, "metadata": {**pod["metadata"], "annotations": {}}}, "missing or unreadable"),
        ({**ok, "metadata": {**pod["metadata"], "annotations": {  # not a whole spec
            render.SPEC: '{"worker_id": "x"}'}}}, "missing or unreadable"),
        ({**ok, "metadata": {**pod["metadata"], "annotations": {render.SPEC: "{"}}},
         "missing or unreadable"),
    ]
    for p, says in cases:
        why = render.unadoptable(p)
        assert why is not None and says in why, (says, why)


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
    # Leases (leader election's): AlreadyExists, Conflict on a stale resourceVersion (replace
    # and patch), list, delete
    coord = client.CoordinationV1Api(core.api_client)
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l1"},
             "spec": {"holderIdentity": "x", "leaseDurationSeconds": 5}}
    rv = coord.create_namespaced_lease("hydraserve", lease).metadata.resource_version
    with pytest.raises(ApiException) as e:
        coord.create_namespaced_lease("hydraserve", lease)
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "AlreadyExists"
    took = {**lease, "metadata": {"name": "l1", "resourceVersion": rv},
            "spec": {"holderIdentity": "y", "leaseDurationSeconds": 5}}
    assert coord.replace_namespaced_lease("l1", "hydraserve", took).spec.holder_identity == "y"
    with pytest.raises(ApiException) as e:  # rv is stale now
        coord.replace_namespaced_lease("l1", "hydraserve",
                                       {**took, "spec": {"holderIdentity": "z"}})
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "Conflict"
    with pytest.raises(ApiException) as e:
        coord.patch_namespaced_lease("l1", "hydraserve", {"metadata": {"resourceVersion": rv},
                                                          "spec": {"holderIdentity": "z"}})
    assert e.value.status == 409
    coord.patch_namespaced_lease("l1", "hydraserve", {"spec": {"holderIdentity": "w"}})
    assert [(x.metadata.name, x.spec.holder_identity) for x in
            coord.list_namespaced_lease("hydraserve").items] == [("l1", "w")]
    coord.delete_namespaced_lease("l1", "hydraserve")
    with pytest.raises(ApiException) as e:
        coord.read_namespaced_lease("l1", "hydraserve")
    assert e.value.status == 404


def test_the_watch_relists_after_410_and_unadoptable_pods_are_deleted(fake, tmp_path,
                                                                      model_dirs, monkeypatch):
    (tmp_path / "models").mkdir()
    start_hydraserve(fake, CFG, str(tmp_path / "models"))
    # a worker pod of a gateway that crashed, never Ready (no worker answers its probe), and
    # one of another gateway
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
        both = [render.pod_name(SPEC.worker_id, gw) for gw in ("hydraserve", "other")]
        assert names() == both  # the cluster is the record: nothing is deleted at start
        assert asyncio.run(backend.list_workers()) == {}  # not Ready: deleted, not adopted
        assert names() == both[1:]  # another gateway's pod is not this one's business
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


def _tick(backend) -> "asyncio.Task":
    """The control plane's tick, as far as leases go: renew_lease every 0.1 s on the loop."""
    async def tick():
        while True:
            backend.renew_lease()
            await asyncio.sleep(0.1)
    return asyncio.get_running_loop().create_task(tick())


@pytest.mark.multiprocess
def test_worker_pods_outlive_their_gateway_and_the_next_one_adopts_them(fake, tmp_path,
                                                                        model_dirs):
    """The cluster is the record: gateway A starts a worker pod and detaches (a crash, a
    handover); gateway B on the same cluster adopts it from the pod alone (its spec
    annotation), renews its lease through the worker's own POST /lease without blocking its
    loop, and stops it. A pod of the gateway that cannot be adopted (its container was
    killed: Failed) is deleted."""
    from hydraserve.engine.config import EngineConfig, ModelConfig, num_kv_blocks

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m").symlink_to(Path(model_dirs["llama"]).resolve())
    start_hydraserve(fake, CFG, str(tmp_path / "models"))
    cfg = dataclasses.replace(CFG, orphan_grace_s=12.0)  # renewals at most every 3 s
    kc = str(fake.write_kubeconfig(tmp_path / "kc"))
    blocks = num_kv_blocks(ModelConfig.from_dir(model_dirs["llama"]), EngineConfig(kv_cache_mb=8))
    spec = WorkerSpec(worker_id="m-7-r0", model="m", node="n1", rank=0, p=1, layers=(0, 4),
                      all_card=True, num_kv_blocks=blocks, instance="m-7", gpu=0, claim_gb=0.4)
    dead = render.worker_pod(dataclasses.replace(spec, worker_id="m-8-r0", node="n0"),
                             cfg.kubernetes, "http://127.0.0.1:9", True, run="old")
    dead["spec"]["containers"][0].update(command=["sleep", "60"], args=[])
    fake.call(fake._create_pod, "hydraserve", dead)
    dead = dead["metadata"]["name"]
    a = kube.KubernetesCluster(cfg, kube.api_client(kc))
    b = None
    try:
        a.start()

        async def gateway_a() -> None:
            await a.start_worker(spec)
            ticking = _tick(a)
            try:
                client = await a.wait_worker(spec.worker_id, 120)
                assert (await client.health()).spec == spec
            finally:
                ticking.cancel()
                await a.aclose()

        asyncio.run(gateway_a())
        fake.call(fake.kill_pod_process, "hydraserve", dead)
        deadline = time.monotonic() + 30
        while fake.call(fake.pod, "hydraserve", dead)["status"]["phase"] != "Failed":
            assert time.monotonic() < deadline, "the killed pod never failed"
            time.sleep(0.1)
        a.detach()
        name = render.pod_name(spec.worker_id, a._run)
        pod = fake.call(fake.pod, "hydraserve", name)
        assert pod is not None and not pod["metadata"].get("deletionTimestamp")  # left running
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("--orphan-grace") + 1] == "12"

        b = kube.KubernetesCluster(cfg, kube.api_client(kc))
        b.start()
        posts: list[tuple[float, str, dict]] = []
        post = b._api.post

        async def recording(url: str, body: dict | None = None) -> dict:
            out = await post(url, body)
            posts.append((time.monotonic(), url, out))
            return out

        b._api.post = recording

        async def gateway_b() -> None:
            listed = await b.list_workers()
            assert list(listed) == [spec.worker_id] and b.worker_alive(spec.worker_id)
            assert (await listed[spec.worker_id].health()).spec == spec
            slowest, t0 = 0.0, time.monotonic()
            while time.monotonic() - t0 < 4.0:  # the tick: renew_lease returns at once
                t = time.perf_counter()
                b.renew_lease()
                slowest = max(slowest, time.perf_counter() - t)
                await asyncio.sleep(0.1)
            renewals = [(t, out) for t, url, out in posts if url.endswith("/lease")]
            # the worker's own answer, at most every grace / 4: at 0 s and 3 s
            assert [out for _, out in renewals] == [{"renewed": True, "grace": 12.0}] * 2
            assert renewals[1][0] - renewals[0][0] >= 2.9 and slowest < 0.05
            assert posts[0][1] == f"{listed[spec.worker_id].url}/lease"
            await b.stop_worker(spec.worker_id)
            assert not b.worker_alive(spec.worker_id)
            await b.aclose()

        asyncio.run(gateway_b())
        assert fake.call(fake.pod, "hydraserve", dead) is None  # not adoptable: deleted
        assert fake.call(fake.pod, "hydraserve", name) is None  # stopped by B
    finally:
        if b is not None:
            b.close()
        a.close()


def test_leader_election_through_a_lease(fake, tmp_path):
    """Two and more KubernetesLeadership contenders on one Lease: one leads and renews past
    its lease duration; after it crashes (its renewals stop, nothing released) another leads
    within leaseDuration + retryPeriod, never before the lease ran out; after a clean release
    the standby leads at its next try; two that write the same free Lease at once get one
    leader and one 409 Conflict."""
    from hydraserve.cluster.k8s_leader import KubernetesLeadership

    api = kube.api_client(str(fake.write_kubeconfig(tmp_path / "kc")))
    lease_s, retry_s = 2, 0.25

    def contender(who: str) -> KubernetesLeadership:
        return KubernetesLeadership(api, "hydraserve", "hydraserve-leader", identity=who,
                                    lease_duration=lease_s, renew_deadline=1.5,
                                    retry_period=retry_s)

    def lease() -> dict:
        return fake.call(fake.lease, "hydraserve", "hydraserve-leader")["spec"]

    a, b, c, d, e = everyone = [contender(x) for x in "abcde"]
    stop, got = threading.Event(), {}

    def standby(x: KubernetesLeadership) -> threading.Thread:
        t = threading.Thread(target=lambda: got.update({x.identity: x.acquire(stop),
                                                        "at": time.monotonic()}))
        t.start()
        return t

    try:
        assert a.try_acquire() and a.held() and a.holder() == "a"
        assert not b.try_acquire() and not b.held() and b.holder() == "a"
        time.sleep(lease_s + 0.5)  # past a lease duration: a's renewals keep it
        assert a.held() and not b.try_acquire()
        s = lease()
        assert (s["holderIdentity"], s["leaseTransitions"], s["leaseDurationSeconds"]) == \
            ("a", 0, lease_s) and s["renewTime"] > s["acquireTime"]
        waiting = standby(b)
        a._stop.set()  # a crash: the renewals stop, nothing is released
        a._thread.join()
        crashed, last = time.monotonic(), a._renewed
        waiting.join(lease_s + 5)
        assert got.get("b") is True, "the standby never took over"
        assert got["at"] - crashed <= lease_s + retry_s + 0.75
        assert got["at"] - last >= lease_s - 0.05  # not before a's lease ran out
        assert not a.held()  # a stopped leading first (renew deadline < lease duration)
        assert (lease()["holderIdentity"], lease()["leaseTransitions"]) == ("b", 1)

        waiting = standby(c)
        time.sleep(2 * retry_s)
        assert not c.held()
        released = time.monotonic()
        b.release()
        assert not b.held()
        waiting.join(lease_s + 5)
        assert got.get("c") is True and got["at"] - released <= retry_s + 0.5
        assert (lease()["holderIdentity"], lease()["leaseTransitions"]) == ("c", 2)

        c.release()
        assert lease()["holderIdentity"] == ""
        barrier = threading.Barrier(2)  # both read the free Lease before either writes
        for x in (d, e):
            x._read = (lambda read: lambda: (read(), barrier.wait(10))[0])(x._read)
        conflicts, won = fake.conflicts, {}
        racers = [threading.Thread(target=lambda x=x: won.update({x.identity: x.try_acquire()}))
                  for x in (d, e)]
        for t in racers:
            t.start()
        for t in racers:
            t.join(15)
        for x in (d, e):
            del x._read
        assert sorted(won.values()) == [False, True] and fake.conflicts == conflicts + 1
        winner, loser = (d, e) if won["d"] else (e, d)
        assert winner.held() and not loser.held() and loser.holder() == winner.identity
        assert (lease()["holderIdentity"], lease()["leaseTransitions"]) == (winner.identity, 3)
    finally:
        stop.set()
        for x in everyone:
            x.release()


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
