"""Control-plane pieces that need no worker: config loading, presets, the queue limit, the admin
token. The cluster object is the real local backend, never started (no processes needed)."""
from __future__ import annotations

import pytest

from hydraserve.cluster.local import LocalCluster
from hydraserve.config import (ConfigError, GatewayConfig, ModelConfigEntry, cluster_from_dict,
                               default_local_cluster, load_cluster, models_from_dict)
from hydraserve.control.controller import Controller, QueueFull
from hydraserve.control.instance import Request
from hydraserve.control.placement import PolicyName
from hydraserve.control.presets import ExecType, preset


def test_cluster_config_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("device: cpu\nshare: false\nstorage: {egress_gbps: 32}\n"
                 "scale: {size_scale: 100}\nservers:\n"
                 "  - {name: a, gpus: [24, 24], nic_gbps: 16, cache_gb: 8}\n")
    cfg = load_cluster(f)
    assert cfg.servers[0].gpus == (24.0, 24.0) and cfg.egress_gbps == 32.0
    assert not cfg.share and cfg.scale.size_scale == 100.0 and cfg.scale.after_fetch_ms == 2000
    for bad in ({"servers": []}, {"servers": [{"name": "a"}]},
                {"servers": [{"name": "a", "gpus": [1], "nic_gbps": 1}] * 2},
                {"device": "tpu", "servers": [{"name": "a", "gpus": [1], "nic_gbps": 1}]}):
        with pytest.raises(ConfigError):
            cluster_from_dict(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_cluster(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError):
        models_from_dict({"models": [{"name": "../x", "path": "/m"}]})


def test_presets_are_the_papers():
    assert preset("serverless_vllm").policy is PolicyName.NAIVE
    assert not preset("serverless_vllm").prefetch and not preset("serverless_vllm").streaming_load
    assert not preset("serverlessllm").share_gpus and preset("serverlessllm").cache
    assert preset("serverlessllm_with_cached_model").warm_cache
    assert preset("hydraserve_with_single_worker").max_p == 1
    assert preset("hydraserve").max_p == 4 and preset("hydraserve_with_cache").cache
    assert len({e.value for e in ExecType}) == 6
    with pytest.raises(ValueError, match="unknown execution type"):
        preset("vllm")


def test_queue_limit_gives_queue_full(llama_dir):
    cluster = LocalCluster(default_local_cluster())
    try:
        gw = GatewayConfig(max_queue=3)
        c = Controller(cluster, default_local_cluster(), gw, preset("hydraserve"))
        ep = c.register(ModelConfigEntry("m", llama_dir))
        assert ep.size_gb > 0 and ep.num_kv_blocks > 0
        for i in range(3):
            c.submit(Request(str(i), "m", [1, 2], {"max_tokens": 1}))
        with pytest.raises(QueueFull):
            c.submit(Request("x", "m", [1, 2], {"max_tokens": 1}))
    finally:
        cluster.close()


def test_admin_routes_need_the_token(llama_dir):
    from fastapi.testclient import TestClient

    from hydraserve.gateway.app import Gateway, create_app

    cfg = default_local_cluster()
    cluster = LocalCluster(cfg)
    try:
        gateway = Gateway(GatewayConfig(admin_token="s3cret"), cfg, cluster, [])
        client = TestClient(create_app(gateway))  # no lifespan: nothing is started
        assert client.get("/admin/instances").status_code == 401
        r = client.get("/admin/instances", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = client.get("/admin/instances", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["instances"] == []
        assert client.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 404
    finally:
        cluster.close()


def test_a_model_that_fits_nowhere_fails_after_the_queue_timeout(llama_dir):
    import dataclasses

    tiny_gpus = dataclasses.replace(
        default_local_cluster(),
        servers=tuple(dataclasses.replace(s, gpus=(1.0,)) for s in default_local_cluster().servers))
    cluster = LocalCluster(tiny_gpus)
    try:
        c = Controller(cluster, tiny_gpus, GatewayConfig(queue_timeout_s=5), preset("hydraserve"))
        ep = c.register(ModelConfigEntry("m", llama_dir))  # needs >= 5 GB, GPUs have 1 GB
        req = Request("r", "m", [1, 2], {"max_tokens": 1})
        c.submit(req)
        c.reconcile(ep, req.arrival + 1)
        assert req.events.empty() and ep.queue == [req] and not ep.instances
        c.reconcile(ep, req.arrival + 6)
        err = req.events.get_nowait()
        assert err["status"] == 503 and "could be started" in err["error"] and not ep.queue
    finally:
        cluster.close()


def test_admission_and_placement_share_one_ttft_model(llama_dir):
    """A cluster whose "after the fetch" constant is 4 s (the embedded default): placement
    accepts a p = 1 fetch of a 6 GB model on a 16 Gbps NIC for a 7.5 s SLO because
    3 s + 4 s < 7.5 s, so that fetch must end within 3.5 s. One second later a second fetch
    would halve its share and end it at 5 s, a TTFT of 9 s by placement's own model: admission
    must refuse (offer 0). With admission's deadline computed from the artifact's 2000 ms
    instead of the cluster's 4000 ms, it offered 8 Gbps here."""
    import dataclasses

    base = default_local_cluster()
    assert base.scale.after_fetch_ms == 4000
    one = dataclasses.replace(base, servers=base.servers[:1])
    cluster = LocalCluster(one)
    try:
        c = Controller(cluster, one, GatewayConfig(), preset("hydraserve"))
        ep = c.register(ModelConfigEntry("m", llama_dir, ttft_slo_s=7.5, size_gb=6.0))
        req = Request("r", "m", [1, 2], {"max_tokens": 1})
        c.submit(req)
        now = req.arrival
        asked = c.placer.request(ep, now, 1)
        placement = c.placer.place(asked)
        assert placement is not None and placement.p == 1
        assert placement.predicted_ttft_ms == pytest.approx(3000 + 4000)
        inst = c.placer.claim(ep, placement, asked, now)
        fetch = inst.stages[0].fetch
        assert fetch.deadline == pytest.approx(now + 3.5)
        later = c.placer.request(ep, now + 1.0, 1)
        assert later.nodes[0].offered_gbps == 0.0
        assert c.placer.place(later) is None  # nothing to place on: the only NIC is refused
    finally:
        cluster.close()


def test_admin_register_keeps_every_field_of_a_model_entry(llama_dir):
    from fastapi.testclient import TestClient

    from hydraserve.gateway.app import Gateway, create_app

    cfg = default_local_cluster()
    cluster = LocalCluster(cfg)
    try:
        gateway = Gateway(GatewayConfig(admin_token="t"), cfg, cluster, [])
        client = TestClient(create_app(gateway))  # no lifespan: nothing is started
        auth = {"Authorization": "Bearer t"}
        body = {"name": "m13", "path": llama_dir, "ttft_slo_s": 12.0, "tpot_slo_ms": 116.0,
                "profiled_tpot_ms": 40.0, "size_gb": 26.0, "owned_by": "team-a"}
        assert client.post("/admin/models", json=body, headers=auth).status_code == 200
        (got,) = client.get("/admin/models", headers=auth).json()["models"]
        assert got == body  # size_gb was dropped (the checkpoint's bytes were used) before
        assert gateway.controller.model("m13").size_gb == 26.0
        bad = client.post("/admin/models", json={**body, "name": "x", "sise_gb": 1}, headers=auth)
        assert bad.status_code == 400 and "sise_gb" in bad.json()["error"]["message"]
    finally:
        cluster.close()


def test_the_cluster_protocol_declares_what_the_control_plane_calls():
    """Every ``cluster.X`` the gateway and the controller call is part of `ClusterBackend`,
    and the local backend implements all of it (a new backend only has to read the protocol)."""
    import inspect
    import re

    from hydraserve.cluster.base import ClusterBackend
    from hydraserve.control import controller
    from hydraserve.gateway import app

    declared = {n for n in vars(ClusterBackend) if not n.startswith("_")}
    called = set()
    for mod in (app, controller):
        source = inspect.getsource(mod)
        called |= set(re.findall(r"(?:self|gateway)\.cluster\.([a-z_]+)", source))
    assert called and called <= declared, f"not in the protocol: {called - declared}"
    missing = [n for n in declared if not callable(getattr(LocalCluster, n, None))]
    assert not missing


def test_a_sequence_no_worker_can_hold_is_refused_with_400(llama_dir):
    """Refused at the gateway, before it reaches (and fails) an instance."""
    from fastapi.testclient import TestClient

    from hydraserve.gateway.app import Gateway, create_app

    cfg = default_local_cluster()
    cluster = LocalCluster(cfg)
    try:
        gateway = Gateway(GatewayConfig(kv_cache_mb=1), cfg, cluster, [])
        client = TestClient(create_app(gateway))  # no lifespan: nothing is started
        client.post("/admin/models", json={"name": "m", "path": llama_dir})
        kv = gateway.controller.model("m").kv_tokens
        assert kv == 1024  # 1 MiB / (2 x 4 layers x 2 heads x 16 dims x 4 bytes) per token
        r = client.post("/v1/completions", json={"model": "m", "prompt": [5] * 20,
                                                 "max_tokens": kv - 19})
        assert r.status_code == 400 and "KV cache" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "max_tokens"
        assert not gateway.controller.model("m").queue
    finally:
        cluster.close()
