"""What a client meets while a model scales from zero, end to end on a real `hydraserve serve`:
SSE comment heartbeats on a stream that waits for a cold start, and admission by free slots
and queue room, with a 429 and Retry-After beyond them."""
from __future__ import annotations

import http.client
import json

import pytest
import yaml

from hydraserve.store.launch import ServerProcess

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_dirs):
    tmp = tmp_path_factory.mktemp("sfz")
    cluster = {"device": "cpu", "scale": {"size_scale": 100, "after_fetch_ms": 2000},
               # one server whose GPU holds one instance (a claim of ceil(S + 5) = 6 GB): the
               # cluster's capacity is one instance's 8 slots
               "servers": [{"name": "s0", "gpus": [8], "nic_gbps": 16}]}
    models = {"models": [{"name": "m", "path": model_dirs["llama"], "ttft_slo_s": 30}]}
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    (tmp / "models.yaml").write_text(yaml.safe_dump(models))
    server = ServerProcess(["serve", "--cluster", str(tmp / "cluster.yaml"), "--models",
                            str(tmp / "models.yaml"), "--port", "0", "--max-queue", "1",
                            "--retry-after", "7", "--sse-heartbeat", "0.3"], tmp / "gateway.log")
    yield server
    assert server.stop() == 0


def _post(port: int, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    return conn.getresponse()


def test_heartbeats_while_cold_and_429_with_retry_after_when_full(gateway):
    body = {"model": "m", "prompt": "hello", "max_tokens": 4, "stream": True}
    stream = _post(gateway.port, body)
    assert stream.status == 200
    # the model is cold: the worker takes seconds to start, so comments come before any data
    first = stream.readline().decode()
    assert first.startswith(": cold start m-") or first == ": heartbeat\n", first
    assert stream.getheader("X-HydraServe-Cold-Start").startswith("m-")
    # admission counts the starting instance's free slots (8) beyond the queue's one place:
    # eight more are admitted while it starts, the next one is refused, with Retry-After
    more = [_post(gateway.port, body) for _ in range(8)]
    assert [r.status for r in more] == [200] * 8
    refused = _post(gateway.port, {**body, "stream": False})
    assert refused.status == 429
    assert refused.getheader("Retry-After") == "7"
    err = json.loads(refused.read())["error"]
    assert err["type"] == "rate_limit_error" and "retry after 7 s" in err["message"]
    beats, data = 1, []
    for raw in stream:
        line = raw.decode().rstrip("\n")
        if line.startswith(": ") and not data:
            beats += 1
        elif line.startswith("data: "):
            data.append(line[6:])
    assert beats >= 2
    assert data[-1] == "[DONE]"
    for r in more:
        assert r.read().decode().rstrip().endswith("data: [DONE]")
    metrics = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    metrics.request("GET", "/metrics")
    text = metrics.getresponse().read().decode()
    assert 'hydraserve_refused_requests_total{model="m"} 1.0' in text
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # warm now: the same request is admitted and answered
    again = _post(gateway.port, {**body, "stream": False})
    assert again.status == 200 and json.loads(again.read())["usage"]["completion_tokens"] == 4
