"""Worker processes: pipelines over TCP, consolidation with KV migration, failures, clean stops."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
import torch

from hydraserve.cluster.pipeline import GroupConfig, LocalPipeline
from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.sequence import SamplingParams
from hydraserve.httpjson import CallError, call
from hydraserve.worker.transport import ConnectionClosed, recv_msg, send_msg

from servers import shm_exists

pytestmark = pytest.mark.multiprocess

REQUESTS = [([5, 9, 13], 24), (list(range(100, 111)), 12), ([42], 30), (list(range(30, 70)), 8)]


def _expected(model_dir: str, requests=REQUESTS) -> list[list[int]]:
    engine = LLMEngine(model_dir)
    return [engine.generate([p], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
            for p, n in requests]


def _run_concurrently(pipe: LocalPipeline, on_token=None, requests=REQUESTS) -> list[list[dict]]:
    results: list[list[dict]] = [[] for _ in requests]

    def one(i: int) -> None:
        prompt, n = requests[i]
        for item in pipe.generate(prompt, max_tokens=n, ignore_eos=True):
            results[i].append(item)
            if on_token:
                on_token(i, len(results[i]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _tokens(items: list[dict]) -> list[int]:
    assert all("error" not in it for it in items), items
    return [it["token_id"] for it in items]


@pytest.mark.parametrize("p", [2, 3, 4])
def test_pipeline_of_processes_matches_one_worker(llama_dir, p):
    expected = _expected(llama_dir)
    with LocalPipeline(GroupConfig(llama_dir, p=p, threads_per_worker=1)) as pipe:
        results = _run_concurrently(pipe)
        assert [_tokens(r) for r in results] == expected
        assert all(r[-1]["finish_reason"] == "length" for r in results)
        assert pipe.health(0)["timeline"]["first_token"] > 0


def test_consolidation_mid_generation_keeps_streams_and_tokens(llama_dir):
    # a long request keeps generating while the switch happens, whatever this machine's speed
    requests = REQUESTS + [(list(range(200, 209)), 400)]
    expected = _expected(llama_dir, requests)
    cfg = GroupConfig(llama_dir, p=3, all_card=(0, 1), threads_per_worker=1)
    with LocalPipeline(cfg) as pipe:
        started = threading.Event()

        last_token_at: dict[int, float] = {}

        def on_token(i: int, n: int) -> None:
            last_token_at[i] = time.time()  # the clock of the workers' timelines
            if i == 0 and n == 6 and not started.is_set():
                started.set()
                pipe.consolidate()

        results = _run_concurrently(pipe, on_token, requests)
        assert started.is_set()
        assert [_tokens(r) for r in results] == expected  # complete, identical, no error events
        head = pipe.health(0)
        assert head["standalone"] and head["active_layers"] == [0, 4]
        assert "consolidated" in head["timeline"]
        # the switch happened while the long request was still streaming (its KV migrated)
        assert head["timeline"]["consolidated"] < last_token_at[len(requests) - 1]
        # the part-card stage exits; the other all-card stage serves the whole model by itself
        pipe.workers[2].proc.wait(20)
        deadline = time.monotonic() + 20
        while not pipe.health(1)["standalone"] and time.monotonic() < deadline:
            time.sleep(0.05)
        items = list(call_stream(pipe.workers[1].url, REQUESTS[0]))
        assert _tokens(items) == expected[0]
        # new requests on the consolidated head
        again = list(pipe.generate(REQUESTS[2][0], max_tokens=REQUESTS[2][1], ignore_eos=True))
        assert _tokens(again) == expected[2]


def call_stream(url: str, request: tuple[list[int], int]):
    from hydraserve.httpjson import stream

    return stream(url, "/generate", {"prompt_ids": request[0], "max_tokens": request[1],
                                     "ignore_eos": True})


def test_killing_a_stage_gives_a_clear_error_quickly(llama_dir):
    with LocalPipeline(GroupConfig(llama_dir, p=3, threads_per_worker=1)) as pipe:
        items, t_kill = [], None
        for item in pipe.generate([1, 2, 3], max_tokens=2000, ignore_eos=True):
            items.append(item)
            if len(items) == 5:
                t_kill = time.monotonic()
                os.kill(pipe.workers[1].proc.pid, signal.SIGKILL)
            if "error" in item:
                break
        assert "error" in items[-1] and "stage" in items[-1]["error"]
        assert time.monotonic() - t_kill < 5
        assert len(items) < 100
        with pytest.raises(CallError, match="503"):
            call(pipe.head, "POST", "/generate", {"prompt_ids": [1], "max_tokens": 2})


def test_bad_generate_requests(llama_dir):
    with LocalPipeline(GroupConfig(llama_dir, p=2, threads_per_worker=1)) as pipe:
        for body, code in [({"max_tokens": 3}, "400"), ({"prompt_ids": []}, "400"),
                           ({"prompt_ids": [1], "max_tokens": 0}, "400"),
                           ({"prompt_ids": [1], "temperature": -1}, "400"),
                           ({"prompt_ids": ["x"]}, "400")]:
            with pytest.raises(CallError, match=code):
                call(pipe.head, "POST", "/generate", body)
        with pytest.raises(CallError, match="503"):  # not the head
            call(pipe.workers[1].url, "POST", "/generate", {"prompt_ids": [1]})
        with pytest.raises(CallError, match="409"):  # a part-card stage cannot consolidate
            call(pipe.workers[1].url, "POST", "/consolidate")
        # a caller that goes away cancels its request
        gen = pipe.generate([1, 2, 3], max_tokens=5000, ignore_eos=True)
        assert "token_id" in next(gen) and "token_id" in next(gen)
        gen.close()  # closes the connection
        deadline = time.monotonic() + 5
        while pipe.health(0)["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipe.health(0)["running"] == 0 and pipe.health(0)["kv_blocks_free"] == \
            pipe.health(0)["kv_blocks"]
        too_long = list(pipe.generate(list(range(5000)), max_tokens=2))
        assert "error" in too_long[-1]
        ok = list(pipe.generate([1, 2], max_tokens=3, ignore_eos=True))
        assert len(_tokens(ok)) == 3


def test_stop_frees_every_process_and_segment(llama_dir):
    pipe = LocalPipeline(GroupConfig(llama_dir, p=3, threads_per_worker=1))
    pipe.start()
    try:
        list(pipe.generate([1, 2, 3], max_tokens=4, ignore_eos=True))
        pipe.consolidate()
        for agent in pipe.agents:  # regions nobody reads yet: only the agent's exit frees them
            call(agent.url, "POST", "/prefetch", {"model": pipe.name, "kind": "full"})
        segments = []
        for agent in pipe.agents:
            segments += [r["shm"] for r in call(agent.url, "GET", "/regions")["regions"]]
        procs = [w.proc for w in pipe.workers + pipe.agents] + [pipe.store.proc]
        assert segments and all(shm_exists(s) for s in segments)
    finally:
        pipe.stop()
    assert all(p.poll() is not None for p in procs)
    assert not any(shm_exists(s) for s in segments)
    assert not any(n.startswith("hs_") and n in segments for n in os.listdir("/dev/shm"))


def test_sigterm_stops_a_worker_promptly(llama_dir):
    """SIGTERM (what a backend sends) must end the process at once, not after its kill timeout:
    nothing may stay blocked waiting for an exit request that never comes."""
    with LocalPipeline(GroupConfig(llama_dir, p=2, threads_per_worker=1)) as pipe:
        list(pipe.generate([1, 2, 3], max_tokens=2, ignore_eos=True))
        proc = pipe.workers[1].proc
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t < 5


def test_transport_roundtrip_and_rejects_garbage():
    a, b = socket.socketpair()
    try:
        tensors = {"h": torch.randn(3, 5), "ids": torch.arange(4), "half": torch.randn(2, 2).half(),
                   "bf": torch.randn(3).bfloat16(), "empty": torch.empty(0, 7)}
        send_msg(a, {"type": "batch", "n": 1}, tensors)
        header, got = recv_msg(b)
        assert header == {"type": "batch", "n": 1}
        for k, t in tensors.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k], t)
        a.sendall(b"NOPE" + b"\0" * 4)
        with pytest.raises(ConnectionClosed, match="magic"):
            recv_msg(b)
        a.sendall(b"HSF1" + (5).to_bytes(4, "little") + b"{bad}")
        with pytest.raises(ConnectionClosed, match="malformed"):
            recv_msg(b)
        a.close()
        with pytest.raises(ConnectionClosed):
            recv_msg(b)
    finally:
        a.close()
        b.close()
