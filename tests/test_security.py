"""Security of what HydraServe exposes: the optional cluster token on the store's, the agents'
and the workers' APIs; the bind addresses; no path from a request to the file system."""
from __future__ import annotations

import asyncio
import http.client
import json
import shutil
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from hydraserve.cli import build_parser
from hydraserve.cluster.base import WorkerSpec
from hydraserve.cluster.local import LocalCluster
from hydraserve.config import ClusterConfig, ScaleConfig, ServerConfig
from hydraserve.protocol import GenerateRequest
from hydraserve.store.launch import ServerProcess

pytestmark = pytest.mark.multiprocess

TOKEN = "s3cret-cluster-token"


def _get(url: str, path: str, token: str | None = None) -> tuple[int, dict]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        body = resp.read()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, {"raw": body[:100].decode(errors="replace")}
    finally:
        conn.close()


def test_internal_servers_bind_loopback_by_default():
    parser = build_parser()
    for argv in (["store", "serve", "--root", "x"], ["store", "agent", "--node", "n", "--remote",
                                                      "http://127.0.0.1:1"],
                 ["worker", "--model", "m", "--layers", "0:1", "--agent", "http://127.0.0.1:1",
                  "--num-kv-blocks", "4"], ["serve"]):
        assert parser.parse_args(argv).host == "127.0.0.1", argv


def test_cluster_token_is_required_and_sent(tmp_path, model_dirs, monkeypatch):
    """With HYDRASERVE_CLUSTER_TOKEN set, the store, an agent and a worker refuse calls without
    it (401, JSON error) and a cluster started with it works end to end: the control plane's
    calls, the agent's fetch from the store and the worker's calls to its agent carry it."""
    monkeypatch.setenv("HYDRASERVE_CLUSTER_TOKEN", TOKEN)  # what the children inherit
    cfg = ClusterConfig(servers=(ServerConfig("n0", (24.0,), 16.0),),
                        scale=ScaleConfig(size_scale=100.0))
    cluster = LocalCluster(cfg, str(tmp_path / "logs"), token=TOKEN)
    try:
        cluster.start()
        cluster.register_model("m", model_dirs["llama"])
        spec = WorkerSpec(worker_id="w0", model="m", node="n0", rank=0, p=1, layers=(0, 4),
                          all_card=True, num_kv_blocks=64)

        async def serve_one() -> list[dict]:
            await cluster.start_worker(spec)
            worker = await cluster.wait_worker("w0", 120)
            await worker.init([])
            body = GenerateRequest([5, 6, 7], {"max_tokens": 3, "ignore_eos": True})
            out = [ev.to_json() async for ev in worker.generate(body)]
            await cluster.aclose()
            return out, worker.url

        items, worker_url = asyncio.run(serve_one())
        assert [i.get("token_id") is not None for i in items] == [True] * 3, items
        for url in (cluster.store_url(), cluster.agent_url("n0"), worker_url):
            for token in (None, "wrong"):
                status, body = _get(url, "/health", token)
                assert status == 401 and "token" in body["error"], (url, status, body)
            assert _get(url, "/health", TOKEN)[0] == 200
    finally:
        cluster.close()


def test_no_token_no_check(tmp_path):
    server = ServerProcess(["store", "serve", "--root", str(tmp_path)], tmp_path / "store.log",
                           env={"HYDRASERVE_CLUSTER_TOKEN": ""})
    try:
        assert _get(server.url, "/health")[0] == 200
    finally:
        server.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dirs):
    tmp = tmp_path_factory.mktemp("sec")
    root = tmp / "root"
    root.mkdir()
    (root / "m").symlink_to(Path(model_dirs["llama"]).resolve())  # a registered model: a link
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not serve me")
    evil = tmp / "evil"  # a model folder whose tokenizer.json links out of it
    shutil.copytree(model_dirs["llama"], evil)
    (evil / "tokenizer.json").unlink()
    (evil / "tokenizer.json").symlink_to(outside / "secret.txt")
    (root / "evil").symlink_to(evil)
    server = ServerProcess(["store", "serve", "--root", str(root)], tmp / "store.log")
    yield server
    server.stop()


@pytest.mark.parametrize("path", [
    "/models/..%2F..%2Fetc/files/config.json",
    "/models/%2Fetc/files/config.json",
    "/models/../etc/layout?p=1",
    "/models/..%2Foutside/image?kind=full",
    "/models/m/files/..%2F..%2Foutside%2Fsecret.txt",
    "/models/m/files/%2Fetc%2Fpasswd",
    "/models/m/files/model.safetensors",  # not a side file: only images serve weights
    "/models/evil/files/tokenizer.json",  # a link out of the model's folder
    "/models/" + quote("m/../../outside", safe="") + "/layout?p=1",
    "/models/.hidden/layout?p=1",
])
def test_store_serves_nothing_outside_its_models(store, path):
    status, body = _get(store.url, path)
    assert status in (400, 404), (path, status, body)
    assert "do not serve me" not in json.dumps(body)


def test_store_still_serves_a_linked_model(store):
    assert _get(store.url, "/models/m/files/config.json")[0] == 200
    assert _get(store.url, "/models/m/layout?p=2")[0] == 200
