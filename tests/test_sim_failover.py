"""A control-plane failover in the simulator (hydraserve/sim/failover.py): the leader dies at
T = 25 s, the standby leads at T + D = 27 s on the same simulated cluster and adopts the warm
instance; what was queued or streamed at T, or arrived meanwhile, is lost or sent again."""
from __future__ import annotations

import json

import pytest

from hydraserve.config import ClusterConfig, ScaleConfig, ServerConfig
from hydraserve.control.lifecycle import read_lifecycle
from hydraserve.sim.costmodel import CostModel
from hydraserve.sim.failover import BROKEN, Failover, report
from hydraserve.sim.run import SimSetting, simulate
from hydraserve.workload.make import TraceRecord

A, B = "Llama2-7B-0", "Llama2-7B-1"  # two endpoints of one model, 13 GB each
T, D = 25.0, 2.0


def rec(t: float, endpoint: str = A, out: int = 1) -> TraceRecord:
    return TraceRecord(t, endpoint, "Llama2-7B", "chatbot", 100, out, 60.0, 200.0)


# A cold-starts at 0 and is warm from ~8.5 s on (keep-alive 30 s); at T it streams request 1
# (2,000 tokens, ~43 s of decode) and B's first request (2), whose cold start began at 24.5 s,
# is queued; request 3 arrives while no leader serves, request 4 right after the takeover.
TRACE = [rec(0.0), rec(24.0, out=2000), rec(24.5, B), rec(26.0), rec(28.0)]


def _run(tmp_path, failover: Failover | None):
    cfg = ClusterConfig(servers=(ServerConfig("a10-0", (80.0,), 16.0),),
                        scale=ScaleConfig(after_fetch_ms=2000))
    setting = SimSetting("hydraserve_with_single_worker", cfg, CostModel.gpu_default(),
                         failover=failover)
    res, stats = simulate(TRACE, setting, tmp_path)
    return res, stats, read_lifecycle(tmp_path / "lifecycle.jsonl")


@pytest.fixture(scope="module")
def ordinary(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("none"), None)


def test_without_a_failover_the_trace_runs_as_ever(ordinary):
    res, stats, events = ordinary
    assert "failover" not in stats
    assert all(r["error"] is None for r in res)
    assert not any("broken" in r or "retried" in r for r in res)
    assert not any(e["event"] == "adopted" for e in events)
    warm = res[4]["ttft_s"]
    assert res[0]["ttft_s"] > 8 and warm < 0.1  # one cold start of A, then warm
    assert res[1]["ttft_s"] == res[3]["ttft_s"] == pytest.approx(warm)
    assert res[1]["output_tokens"] == 2000
    assert [e["model"] for e in events if e["event"] == "created"] == [A, B]


def test_the_standby_adopts_the_warm_instance_and_the_clients_retry(tmp_path, ordinary):
    res, stats, events = _run(tmp_path, Failover(T, D))
    warm, cold = ordinary[0][4]["ttft_s"], ordinary[0][2]["ttft_s"]
    fo = stats["failover"]
    assert (fo["killed_at_s"], fo["leads_at_s"]) == (T, T + D)
    assert (fo["queued_at_kill"], fo["streams_at_kill"]) == (1, 1)
    # A's ready worker is adopted, B's loading one (its start was the dead leader's) stopped
    assert (fo["adopted_instances"], fo["stopped_workers"]) == (1, 1)
    (adopted,) = [e for e in events if e["event"] == "adopted"]
    assert adopted["t"] == T + D and adopted["model"] == A
    # no cold start of A after T: the request right after the takeover is warm on it
    assert [(e["model"], e["t"]) for e in events if e["event"] == "created"] == \
        [(A, 0.0), (B, 24.5), (B, T + D)]  # B starts again when its request is sent again
    (end4,) = [e for e in events if e["event"] == "request_end" and e["request"] == "sim-4"]
    assert end4["instance"] == adopted["instance"]
    assert res[4]["ttft_s"] == pytest.approx(warm) and "broken" not in res[4]
    # what the failover hit was sent again at T + D; TTFT counts from the first send
    assert [(r.get("broken"), r.get("retried")) for r in res] == \
        [(None, None), ("stream", True), ("queued", True), ("refused", True), (None, None)]
    assert all(r["error"] is None for r in res)
    assert res[1]["output_tokens"] == 2000
    assert res[1]["ttft_s"] == pytest.approx(T + D - 24.0 + warm)
    assert res[2]["ttft_s"] == pytest.approx(T + D - 24.5 + cold)
    assert res[3]["ttft_s"] == pytest.approx(T + D - 26.0 + warm)
    rep = report(Failover(T, D), res, events, fo, (ordinary[0], ordinary[2]))
    assert rep["lost"] == {"queued": 1, "streams": 1} and rep["refused_during_takeover"] == 1
    assert (rep["failed_without_retry"], rep["retried"], rep["failed_of_those"]) == (3, 3, 0)
    assert rep["met_ttft_slo_of_those"] == 3  # 60 s SLOs: the retries are in time
    assert rep["cold_starts"] == 3 and rep["without_failover"]["cold_starts"] == 2
    json.dumps(rep)


def test_without_the_client_retry_what_the_failover_hit_fails(tmp_path, ordinary):
    res, stats, events = _run(tmp_path, Failover(T, D, retry=False))
    assert [r["error"] for r in res] == [None, BROKEN["stream"], BROKEN["queued"],
                                         BROKEN["refused"], None]
    assert not any(r.get("retried") for r in res)
    assert res[1]["ttft_s"] is None and res[1]["output_tokens"] == 0
    assert res[4]["ttft_s"] == pytest.approx(ordinary[0][4]["ttft_s"])  # adopted, warm
    assert [e["model"] for e in events if e["event"] == "created"] == [A, B]
    rep = report(Failover(T, D, retry=False), res, events, stats["failover"],
                 (ordinary[0], ordinary[2]))
    assert (rep["failed_without_retry"], rep["failed_of_those"], rep["failed"]) == (3, 3, 3)
    assert rep["ttft_attainment"]["total"] == 40.0 and rep["met_ttft_slo_of_those"] == 0
    # requests 1 and 2 came before T, 3 in the window from it: each met its SLO without one
    assert rep["ttft_outcome_changes"] == {"before": {"worse": 2, "better": 0},
                                           "window": {"worse": 1, "better": 0},
                                           "after": {"worse": 0, "better": 0}}
    assert rep["after_failover"]["ttft_attainment"]["total"] == 50.0  # requests 3 and 4


def test_the_sim_command_reports_the_failover(tmp_path, capsys):
    from hydraserve import cli
    from hydraserve.workload.make import write_trace

    write_trace(tmp_path / "t.jsonl", TRACE, {"cv": 8, "rate": 0.2})
    assert cli.main(["sim", str(tmp_path / "t.jsonl"), "--exec-type",
                     "hydraserve_with_single_worker", "--out", str(tmp_path / "run"),
                     "--failover-at", str(T), "--takeover-s", str(D)]) == 0
    said = capsys.readouterr().out
    assert "failover at 25 s, the standby leads 2 s later" in said
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["source"] == "sim-failover"
    fo = summary["failover"]
    assert (fo["at_s"], fo["takeover_s"], fo["retried"], fo["failed"]) == (T, D, 3, 0)
    assert fo["without_failover"]["failed"] == 0
    assert fo["after_failover"]["requests"] == 2  # scheduled in [T, T + 300 s)
    assert (tmp_path / "run" / "without-failover" / "replay.jsonl").exists()
