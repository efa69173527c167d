"""The steady state of every worker mode: a standalone worker (p = 1), a pipeline head (p = 2),
and a pipeline after consolidation. In each, a new request joins the running batch at the next
engine step (a short request beside a long one is not held up by it), a client that closes its
connection is aborted at once and its KV blocks are free within 2 engine steps, and a stream
resumed with its tokens so far (what the control plane sends after a lost worker) continues
token for token as an uninterrupted run, greedy and seeded sampling alike."""
from __future__ import annotations

import http.client
import json
import time

import pytest

from hydraserve.cluster.pipeline import GroupConfig, LocalPipeline
from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.sequence import SamplingParams
from hydraserve.httpjson import call
from hydraserve.make_model import ModelSpec, make_model

pytestmark = pytest.mark.multiprocess

MODES = ["p1", "p2", "consolidated"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("warm")
    return str(make_model(tmp / "m", ModelSpec(arch="llama", hidden=128, layers=4, vocab=1024,
                                               seed=3)))


@pytest.fixture(scope="module", params=MODES)
def worker(request, model):
    """(mode, head URL) of a warm worker in that mode."""
    mode = request.param
    if mode == "p1":
        cfg = GroupConfig(model, p=1, threads_per_worker=1)
    elif mode == "p2":
        cfg = GroupConfig(model, p=2, threads_per_worker=1)
    else:
        cfg = GroupConfig(model, p=3, all_card=(0,), threads_per_worker=1)
    with LocalPipeline(cfg) as pipe:
        list(pipe.generate([1, 2, 3], max_tokens=2, ignore_eos=True))  # warm
        if mode == "consolidated":
            pipe.consolidate()
            deadline = time.monotonic() + 60
            while not pipe.health(0)["standalone"]:
                assert time.monotonic() < deadline, "the head did not consolidate"
                time.sleep(0.05)
        yield mode, pipe.head


class Stream:
    """A /generate stream on its own connection; ``close()`` drops it as a client would."""

    def __init__(self, url: str, body: dict):
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.conn.request("POST", "/generate", body=json.dumps(body),
                          headers={"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()

    def items(self):
        for line in self.resp:
            if line.strip():
                yield json.loads(line)

    def close(self) -> None:
        self.conn.sock.close()
        self.conn.close()


def _short(url: str) -> float:
    t0 = time.monotonic()
    items = list(Stream(url, {"prompt_ids": [7, 8, 9], "max_tokens": 2,
                              "ignore_eos": True}).items())
    assert [it.get("finish_reason") for it in items] == [None, "length"], items
    return time.monotonic() - t0


def _health(url: str) -> dict:
    return call(url, "GET", "/health")


def _idle(url: str) -> dict:
    """Wait until the worker runs nothing (a stream an earlier test dropped is aborted)."""
    deadline = time.monotonic() + 10
    while (h := _health(url))["running"] or h["kv_blocks_free"] != h["kv_blocks"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.01)
    return h


def test_a_short_request_beside_a_long_one_is_not_held_up(worker):
    mode, url = worker
    _idle(url)
    idle = min(_short(url) for _ in range(3))
    long = Stream(url, {"prompt_ids": [4, 5, 6], "max_tokens": 1500, "ignore_eos": True})
    seen = 0
    for _ in long.items():
        seen += 1
        if seen == 10:
            break
    try:
        beside = _short(url)
        assert _health(url)["running"] == 1  # the long one still runs beside it
    finally:
        long.close()
    assert beside < 3 * idle + 1.0, (mode, idle, beside)


def test_a_closed_client_frees_its_blocks_within_two_steps(worker):
    mode, url = worker
    total = _idle(url)["kv_blocks"]
    stream = Stream(url, {"prompt_ids": list(range(1, 40)), "max_tokens": 1000,
                          "ignore_eos": True})
    seen = 0
    for _ in stream.items():
        seen += 1
        if seen == 5:
            break
    assert _health(url)["kv_blocks_free"] < total
    stream.close()
    at_close = _health(url)["steps"]  # after the close: it reached the worker before this
    deadline = time.monotonic() + 10
    while (h := _health(url))["kv_blocks_free"] != total:
        assert time.monotonic() < deadline, (mode, h)
        time.sleep(0.005)
    time.sleep(0.2)
    h = _health(url)
    assert h["running"] == 0 and h["kv_blocks_free"] == total
    assert h["steps"] - at_close <= 2, (mode, at_close, h["steps"])


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 5}])
def test_a_resumed_stream_continues_as_an_uninterrupted_run(worker, model, sampling):
    mode, url = worker
    _idle(url)
    prompt, n = [11, 12, 13, 14], 40
    whole = [it["token_id"] for it in Stream(url, {"prompt_ids": prompt, "max_tokens": n,
                                                    "ignore_eos": True, **sampling}).items()]
    reference = LLMEngine(model).generate(
        [prompt], SamplingParams(max_tokens=n, ignore_eos=True, **sampling))[0].token_ids
    assert whole == reference  # the engine in-process, as an independent run
    for cut in (1, 17, n - 1):
        rest = [it["token_id"] for it in Stream(url, {
            "prompt_ids": prompt, "output_ids": whole[:cut], "max_tokens": n,
            "ignore_eos": True, **sampling}).items()]
        assert whole[:cut] + rest == whole, (mode, cut)

