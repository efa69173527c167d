"""The operator's view without a cluster: a cold start's critical-path phases from its stages'
traces, the gateway's metrics of the control plane's events, and the Grafana dashboard under
scripts/ (it loads, and every expression in it names a metric the gateway exports)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hydraserve.cluster.local import LocalCluster
from hydraserve.config import GatewayConfig, default_local_cluster
from hydraserve.control.coldstart import PHASES, ColdStart, StageTrace

DASHBOARD = Path(__file__).resolve().parents[1] / "scripts" / "grafana" / "hydraserve.json"


def _record() -> ColdStart:
    """A 2-stage start: request at 10.0, instance at 10.1, workers ordered at 10.2; stage 1's
    imports end last (13.0), the fetch of stage 0 ends at 16.0 (hidden up to the ring at
    13.5), its load at 16.2, the head's engine at 16.4, the first token at 16.9."""
    stages = [StageTrace(0, "s0", 0, True, ordered=10.2, serving=13.2,
                         worker={"spawned": 0.0, "imports_done": 2.5, "attached": 0.1,
                                 "weights_ready": 6.0, "engine_ready": 6.2},
                         fetch_bytes=8 * 10**9, fetch_s=5.85),
                  StageTrace(1, "s1", 0, False, ordered=10.2, serving=13.3,
                             worker={"spawned": 0.0, "imports_done": 2.8,
                                     "weights_ready": 5.5},
                             fetch_bytes=8 * 10**9, fetch_s=4.0)]
    rec = ColdStart("m-0", "m", "hydraserve", 2, "ours", 6.0, False, created=10.1,
                    stages=stages, arrival=10.0,
                    timeline={"prefetch_started": 0.05, "workers_spawned": 0.1, "ready": 3.4,
                              "first_token": 6.8})
    return rec


def test_the_phases_are_the_critical_path_and_add_up_to_the_ttft():
    rec = _record()
    ph = rec.phases()
    assert list(ph) == list(PHASES)
    # imports end at 13.0 (stage 1), the servers at 13.3, the ring at 13.5; the fetch of
    # stage 0 (from 10.15, 5.85 s) at 16.0, its load at 16.2, the engine at 16.4
    want = {"queue": 0.1, "placement": 0.05, "spawn": 0.05, "imports": 2.8, "server": 0.3,
            "ring": 0.2, "fetch": 2.5, "load": 0.2, "engine": 0.2, "first_token": 0.5}
    assert ph == {k: pytest.approx(v, abs=1e-6) for k, v in want.items()}
    assert sum(ph.values()) == pytest.approx(rec.ttft) == pytest.approx(6.9)
    assert rec.stages[0].fetch_gbps == pytest.approx(64 / 5.85)
    # a step not known (no fetch stats) adds nothing: its time goes to the next phase
    rec.stages[0].fetch_s = rec.stages[1].fetch_s = None
    ph = rec.phases()
    assert ph["fetch"] == 0 and sum(ph.values()) == pytest.approx(6.9)
    assert ph["load"] == pytest.approx(16.2 - 13.5)


def test_the_timeline_rows_overlap_as_the_steps_ran():
    rec = _record()
    rows = {s["rank"]: {seg["name"]: (seg["start"], seg["end"]) for seg in
                        rec.to_json()["stages"][s["rank"]]["segments"]}
            for s in rec.to_json()["stages"]}
    assert rows[0]["imports"] == pytest.approx((0.2, 2.7))
    assert rows[0]["fetch"] == pytest.approx((0.15, 6.0))
    assert rows[0]["load"] == pytest.approx((0.3, 6.2))
    assert rows[0]["first_token"] == pytest.approx((6.4, 6.9))
    assert "first_token" not in rows[1] and "engine" not in rows[1]
    before = rec.to_json()
    assert before["phases"] is not None and before["ttft_s"] == pytest.approx(6.9)
    del rec.timeline["first_token"]
    assert rec.phases() is None and rec.to_json()["ttft_s"] is None


@pytest.fixture(scope="module")
def gateway(model_dirs):
    from fastapi.testclient import TestClient

    from hydraserve.gateway.app import Gateway, create_app

    cfg = default_local_cluster()
    cluster = LocalCluster(cfg)
    gw = Gateway(GatewayConfig(), cfg, cluster, [])
    client = TestClient(create_app(gw))  # no lifespan: nothing is started
    assert client.post("/admin/models", json={"name": "m", "path": model_dirs["llama"]}) \
        .status_code == 200
    client.gateway = gw
    yield client
    cluster.close()


def test_events_become_metrics(gateway):
    rec = _record()
    emit = gateway.gateway.controller.state.emit
    emit("cold_start", **rec.to_json())
    emit("fetch", server="s0", model="m", instance="m-0", bytes=8 * 10**9, seconds=4.0)
    emit("consolidation", model="m", instance="m-0", outcome="done", seconds=3.5)
    emit("failure", kind="worker_lost", model="m", instance="m-0")
    text = gateway.get("/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    labels = 'exec_type="hydraserve",model="m",p="2"'
    want = {f'hydraserve_cold_start_phase_seconds_sum{{{labels},phase="fetch"}}': 2.5,
            f'hydraserve_cold_start_phase_seconds_count{{{labels},phase="queue"}}': 1,
            f'hydraserve_cold_start_ttft_seconds_sum{{{labels}}}': 6.9,
            'hydraserve_cold_start_ttft_ratio_sum{exec_type="hydraserve"}': 6.9 / 6.0,
            'hydraserve_fetched_bytes_total{server="s0"}': 8e9,
            'hydraserve_fetch_throughput_bytes_per_second_sum{server="s0"}': 2e9,
            'hydraserve_consolidations_total{model="m",outcome="done"}': 1,
            'hydraserve_consolidation_seconds_sum{model="m"}': 3.5,
            'hydraserve_failures_total{kind="worker_lost"}': 1}
    assert {k: values.get(k) for k in want} == {k: pytest.approx(v) for k, v in want.items()}
    # what the cluster holds now, read at the scrape: 4 servers of one 24 GB GPU each
    assert text.count("hydraserve_gpu_memory_free_bytes{") == 4


def test_the_grafana_dashboard_uses_only_exported_metrics(gateway):
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 20 and all(p["datasource"]["type"] == "prometheus"
                                    for p in dash["panels"])
    text = gateway.get("/metrics").text
    families = set(re.findall(r"^# TYPE (\S+) (\S+)", text, re.M))
    exported = set()
    for name, kind in families:
        exported.add(name)
        if kind == "histogram":
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
        if kind == "counter":
            exported.add(name + "_total")
    used = {m for e in exprs for m in re.findall(r"\bhydraserve_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    for needed in ("hydraserve_cold_start_phase_seconds_sum", "hydraserve_fetched_bytes_total",
                   "hydraserve_gpu_memory_booked_bytes", "hydraserve_nic_fetch_bookings",
                   "hydraserve_warm_runtimes", "hydraserve_consolidations_total",
                   "hydraserve_failures_total", "hydraserve_cold_start_ttft_ratio_bucket"):
        assert needed in used
