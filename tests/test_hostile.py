"""Hostile and malformed requests against the gateway (FastAPI's test client; no request here
reaches a worker): each gets its status and an OpenAI-shaped error naming the field, and the
server is alive after all of them."""
from __future__ import annotations

import json

import pytest

from hydraserve.cluster.local import LocalCluster
from hydraserve.config import GatewayConfig, default_local_cluster

OK = {"model": "m", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def deep(n: int) -> bytes:
    return b'{"model": "m", "prompt": "x", "x": ' + b"[" * n + b"]" * n + b"}"


# (name, path, body (dict, or raw bytes), status, param or None, a piece of the message)
CASES = [
    ("max_tokens past the context", "/v1/completions", {**OK, "max_tokens": 10**12}, 400,
     "max_tokens", "maximum context length is 3072"),
    ("max_tokens past the server's cap", "/v1/completions", {**OK, "max_tokens": 2000}, 400,
     "max_tokens", "at most 1024"),
    ("max_tokens zero", "/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens", None),
    ("max_tokens a float", "/v1/completions", {**OK, "max_tokens": 4.0}, 400, "max_tokens", None),
    ("max_tokens a string", "/v1/completions", {**OK, "max_tokens": "4"}, 400, "max_tokens",
     None),
    ("max_tokens a bool", "/v1/completions", {**OK, "max_tokens": True}, 400, "max_tokens", None),
    ("stream a string", "/v1/completions", {**OK, "stream": "yes"}, 400, "stream", None),
    ("stream a number", "/v1/completions", {**OK, "stream": 1}, 400, "stream", None),
    ("ignore_eos a string", "/v1/completions", {**OK, "ignore_eos": "true"}, 400, "ignore_eos",
     None),
    ("temperature a string", "/v1/completions", {**OK, "temperature": "0.5"}, 400,
     "temperature", None),
    ("temperature too high", "/v1/completions", {**OK, "temperature": 5}, 400, "temperature",
     None),
    ("top_p zero", "/v1/completions", {**OK, "top_p": 0}, 400, "top_p", None),
    ("n of 2", "/v1/completions", {**OK, "n": 2}, 400, "n", None),
    ("seed a string", "/v1/completions", {**OK, "seed": "7"}, 400, "seed", None),
    ("seed too large", "/v1/completions", {**OK, "seed": 2**70}, 400, "seed", None),
    ("stop of five", "/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     None),
    ("stream_options.include_usage a string", "/v1/completions",
     {**OK, "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options",
     None),
    ("prompt missing", "/v1/completions", {"model": "m"}, 400, "prompt", None),
    ("prompt a number", "/v1/completions", {"model": "m", "prompt": 5}, 400, "prompt", None),
    ("prompt ids with a bool", "/v1/completions", {"model": "m", "prompt": [1, True]}, 400,
     "prompt", None),
    ("prompt ids outside the vocabulary", "/v1/completions", {"model": "m", "prompt": [10**6]},
     400, "prompt", "vocabulary"),
    ("prompt empty", "/v1/completions", {"model": "m", "prompt": []}, 400, "prompt", "empty"),
    ("model missing", "/v1/completions", {"prompt": "x"}, 400, "model", None),
    ("model a number", "/v1/completions", {"model": 3, "prompt": "x"}, 400, "model", None),
    ("unknown model", "/v1/completions", {**OK, "model": "nope"}, 404, "model", "does not exist"),
    ("model a path", "/v1/completions", {**OK, "model": "../../etc/passwd"}, 404, "model", None),
    ("chat message without content", "/v1/chat/completions",
     {"model": "m", "messages": [{"role": "user"}]}, 400, "messages", "needs a content"),
    ("chat role unknown", "/v1/chat/completions",
     {"model": "m", "messages": [{"role": "root", "content": "x"}]}, 400, "messages", None),
    ("chat messages empty", "/v1/chat/completions", {"model": "m", "messages": []}, 400,
     "messages", None),
    ("chat content a number", "/v1/chat/completions",
     {"model": "m", "messages": [{"role": "user", "content": 5}]}, 400, "messages", None),
    ("chat max_completion_tokens past the context", "/v1/chat/completions",
     {**CHAT, "max_completion_tokens": 10**9}, 400, "max_tokens", "maximum context length"),
    ("body not JSON", "/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("body a list", "/v1/completions", b"[1, 2]", 400, None, None),
    ("body empty", "/v1/completions", b"", 400, None, None),
    ("body nested 10,000 deep", "/v1/completions", deep(10_000), 400, None, "deeper than 64"),
    ("body of 9 MB", "/v1/completions",
     json.dumps({**OK, "prompt": "x" * (9 * 2**20)}).encode(), 413, None, "larger than"),
    ("logprobs", "/v1/completions", {**OK, "logprobs": 2}, 400, "logprobs", None),
]


@pytest.fixture(scope="module")
def client(model_dirs):
    from fastapi.testclient import TestClient

    from hydraserve.gateway.app import Gateway, create_app

    cfg = default_local_cluster()
    cluster = LocalCluster(cfg)
    # max_queue=0: a request that passed validation gets 429 at once instead of waiting for an
    # instance that this loop-less test server never starts (so a missed refusal fails fast)
    gateway = Gateway(GatewayConfig(max_queue=0), cfg, cluster, [])
    c = TestClient(create_app(gateway))  # no lifespan: no cluster process is started
    assert c.post("/admin/models", json={"name": "m", "path": model_dirs["llama"]}).status_code \
        == 200
    c.gateway = gateway
    yield c
    cluster.close()


@pytest.mark.parametrize("name,path,body,status,param,text", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_is_refused(client, name, path, body, status, param, text):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if param is not None:
        assert err["param"] == param, err
    if text is not None:
        assert text in err["message"], err


def test_a_valid_request_passes_validation(client):
    r = client.post("/v1/completions", json=OK)
    assert r.status_code == 429  # it reached the queue (see the fixture)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 429


def test_the_server_is_alive_and_nothing_was_queued(client):
    for name, path, body, *_ in CASES:
        client.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"})
    assert client.get("/health").json()["ok"]
    assert client.get("/v1/models").status_code == 200
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert not any(ep.queue for ep in client.gateway.controller.models().values())
