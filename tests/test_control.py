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
        c._reconcile(ep, req.arrival + 1)
        assert req.events.empty() and ep.queue == [req] and not ep.instances
        c._reconcile(ep, req.arrival + 6)
        err = req.events.get_nowait()
        assert err["status"] == 503 and "could be started" in err["error"] and not ep.queue
    finally:
        cluster.close()
