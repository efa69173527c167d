"""The warm runtime pool of the local backend: pre-started `hydraserve runtime` processes that a
worker start adopts (real processes, real fetches, real tokens)."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import pytest

from hydraserve.cluster.local import LocalCluster
from hydraserve.config import ClusterConfig, ScaleConfig, ServerConfig

from test_cluster_contract import spec, start, tokens

pytestmark = pytest.mark.multiprocess

CFG = ClusterConfig(servers=(ServerConfig("n0", (24.0,), 16.0), ServerConfig("n1", (24.0,), 16.0)),
                    scale=ScaleConfig(size_scale=100.0), warm_runtimes=1)


def wait_for(pred, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def cluster(model_dirs):
    c = LocalCluster(CFG)
    try:
        c.start()
        c.register_model("m", model_dirs["llama"])
        yield c
    finally:
        c.close()


def serve_one(cluster, wid: str, node: str, model_dir: str) -> tuple[list[int], dict]:
    async def main():
        s = spec(wid, node, 0, 1, (0, 4), True, model_dir)
        (client,) = await start(cluster, [s])
        out = await tokens(client), (await client.health()).timeline
        await cluster.stop_worker(wid)
        await cluster.aclose()
        return out

    return asyncio.run(main())


def test_a_worker_adopts_a_runtime_and_the_pool_refills(cluster, model_dirs):
    pool = cluster.pool()
    assert [len(pool[n]) for n in ("n0", "n1")] == [1, 1]
    assert {n: c["idle"] for n, c in cluster.warm_pool().items()} == {"n0": 1, "n1": 1}
    runtime = pool["n0"][0]
    got, timeline = serve_one(cluster, "w-warm", "n0", model_dirs["llama"])
    assert cluster.adopted == 1
    log = next(cluster.log_dir.glob("runtime-n0-*.log")).read_text()
    assert f"pid {runtime}" in log and "adopted as worker w-warm" in log
    # the imports were done before the order came
    assert timeline["imports_done"] - timeline["spawned"] < 1.0, timeline
    wait_for(lambda: len(cluster.pool()["n0"]) == 1 and cluster.pool()["n0"][0] != runtime,
             what="a refill on n0")
    # the same tokens as a worker started the ordinary way
    with cluster.runtimes.lock:
        idle = cluster.runtimes.idle["n1"][:]
        cluster.runtimes.idle["n1"].clear()  # an empty pool: the ordinary start
    for p in idle:
        p.stop()
    ref, _ = serve_one(cluster, "w-cold", "n1", model_dirs["llama"])
    assert cluster.adopted == 1 and got == ref


def test_a_runtime_that_died_while_idle_is_replaced(cluster, model_dirs, caplog):
    (dead,) = cluster.pool()["n1"]
    os.kill(dead, signal.SIGKILL)  # a process we started (the pool's)
    wait_for(lambda: not cluster.pool()["n1"], 10, "the kill")
    got, _ = serve_one(cluster, "w-after", "n1", model_dirs["llama"])
    assert len(got) == 6 and f"pid {dead} died while idle" in caplog.text
    # the worker took the replacement (still importing) or started the ordinary way; either
    # way the pool is whole again
    wait_for(lambda: len(cluster.pool()["n1"]) == 1, what="the replacement")
    assert dead not in cluster.pool()["n1"]
    adopted = cluster.adopted
    got2, _ = serve_one(cluster, "w-next", "n1", model_dirs["llama"])
    assert got2 == got and cluster.adopted == adopted + 1


def test_close_leaves_no_runtime(model_dirs):
    c = LocalCluster(CFG)
    c.start()
    pids = [p for ps in c.pool().values() for p in ps]
    assert len(pids) == 2
    c.close()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_serve_with_a_warm_runtime_answers_from_an_adopted_worker(tmp_path, model_dirs):
    """`hydraserve serve --warm-runtime 1`: the pool is visible in the admin API, and the cold
    start's worker is a runtime that was adopted."""
    import json
    import urllib.request

    import yaml

    from hydraserve.config import cluster_to_dict
    from hydraserve.store.launch import ServerProcess

    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster_to_dict(
        dataclasses.replace(CFG, warm_runtimes=0))))
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "m", "path": model_dirs["llama"], "ttft_slo_s": 30}]}))
    gw = ServerProcess(["serve", "--cluster", str(tmp_path / "cluster.yaml"), "--models",
                        str(tmp_path / "models.yaml"), "--port", "0", "--warm-runtime", "1",
                        "--log-dir", str(tmp_path / "logs")], tmp_path / "gw.log", timeout=120)
    try:
        def admin() -> dict:
            with urllib.request.urlopen(gw.url + "/admin/instances", timeout=30) as r:
                return json.loads(r.read())

        wait_for(lambda: all(p["imported"] == 1 for p in admin()["warm_runtimes"].values()),
                 what="the pool's imports")
        assert sorted(admin()["warm_runtimes"]) == ["n0", "n1"]
        req = urllib.request.Request(gw.url + "/v1/completions", data=json.dumps(
            {"model": "m", "prompt": "x", "max_tokens": 3}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 3
        logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("runtime-*.log"))
        assert "adopted as worker m-" in logs
    finally:
        assert gw.stop() == 0
