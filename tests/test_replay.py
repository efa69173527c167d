"""A short replay against a real `hydraserve serve` (local cluster, worker processes): every
trace request is accounted for -- answered with exactly its output length, or recorded with
its error -- and the gateway's lifecycle log gives the analysis its GPU cost."""
from __future__ import annotations

import json

import pytest
import yaml

from hydraserve.control.lifecycle import read_lifecycle
from hydraserve.store.launch import ServerProcess
from hydraserve.workload.analyze import summarize
from hydraserve.workload.make import TraceRecord, read_trace, write_trace
from hydraserve.workload.replay import ReplayConfig, read_results, replay

pytestmark = pytest.mark.multiprocess


def rec(t, endpoint, app="chatbot", prompt=12, out=6, slo=60.0):
    return TraceRecord(time=t, endpoint=endpoint, model="Llama2-7B", application=app,
                       prompt_tokens=prompt, max_tokens=out, ttft_slo_s=slo, tpot_slo_ms=200.0)


def test_replay_accounts_for_every_request(tmp_path, llama_dir):
    import asyncio

    cluster = {"device": "cpu", "scale": {"size_scale": 100, "after_fetch_ms": 2000},
               "servers": [{"name": f"s{i}", "gpus": [24], "nic_gbps": 16} for i in range(2)]}
    models = {"models": [{"name": n, "path": llama_dir, "ttft_slo_s": 60} for n in ("e0", "e1")]}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    lifecycle = tmp_path / "lifecycle.jsonl"
    records = [rec(0.0, "e0"), rec(0.2, "e1", "code", prompt=30, out=9),
               rec(0.4, "nope"),  # no such endpoint: a 404, recorded
               rec(0.6, "e0", "summarization", prompt=5000, out=4),  # longer than the context
               rec(1.0, "e0", out=3)]
    write_trace(tmp_path / "trace.jsonl", records, {"source": "test"})
    meta, back = read_trace(tmp_path / "trace.jsonl")
    assert back == records
    server = ServerProcess(["serve", "--cluster", str(tmp_path / "cluster.yaml"), "--models",
                            str(tmp_path / "models.yaml"), "--port", "0", "--keep-alive", "2",
                            "--lifecycle-log", str(lifecycle), "--log-dir",
                            str(tmp_path / "logs")], tmp_path / "serve.log", timeout=120)
    try:
        cfg = ReplayConfig(url=server.url, concurrency=4, timeout_s=120, token_high=500,
                           progress=False)
        results = asyncio.run(replay(back, cfg, tmp_path / "replay.jsonl", {"trace": "t"}))
    finally:
        assert server.stop(timeout=60) == 0
    meta, stored = read_results(tmp_path / "replay.jsonl")
    assert meta["requests"] == 5 and stored == results
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    for i in (0, 1, 4):
        r = results[i]
        assert r["status"] == 200 and r["error"] is None, r
        assert r["output_tokens"] == records[i].max_tokens and r["finish_reason"] == "length"
        assert 0 < r["ttft_s"] < 120 and r["sent"] >= records[i].time - 0.05
        assert r["tpot_ms"] is not None and len(r["chunk_times"]) >= 1
    assert results[2]["status"] == 404 and "does not exist" in results[2]["error"]
    assert results[3]["status"] == 400 and results[3]["ttft_s"] is None
    events = read_lifecycle(lifecycle)
    kinds = [e["event"] for e in events]
    assert kinds.count("created") >= 2 and "ready" in kinds and kinds.count("request_end") == 3
    assert kinds.count("deleted") == kinds.count("created")  # the server stopped everything
    s = summarize(results, events, exec_type="hydraserve", cv=8, rate=1, source="real")
    assert s["ttft_attainment"]["total"] == 60.0 and s["failed"] == 2
    assert s["cost_gbs_per_request"] > 0
    json.dumps(s)  # the summary is plain JSON


def test_unanswered_requests_are_recorded_not_dropped(tmp_path):
    """A server that accepts connections and never answers: the request times out and is
    recorded; a request scheduled after the replay is cancelled is recorded as not sent."""
    import asyncio
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        cfg = ReplayConfig(url=url, timeout_s=0.5, progress=False)
        results = asyncio.run(replay([rec(0.0, "e0")], cfg, tmp_path / "a.jsonl"))
        assert "within" in results[0]["error"] and results[0]["status"] is None

        async def cut_short():
            task = asyncio.create_task(replay([rec(0.0, "e0"), rec(30.0, "e0")],
                                              ReplayConfig(url=url, timeout_s=60,
                                                           progress=False),
                                              tmp_path / "b.jsonl"))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cut_short())
        _, got = read_results(tmp_path / "b.jsonl")
        assert [r["error"] for r in got] == ["cancelled", "not sent"]
    finally:
        sock.close()
