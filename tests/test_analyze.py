"""The end-to-end analysis on hand-computed cases: SLO attainment (failures count as
violations) and GPU cost from a lifecycle log with consolidation, a split and a keep-alive."""
from __future__ import annotations

import json

import pytest

from hydraserve.control.lifecycle import LifecycleLog, read_lifecycle
from hydraserve.workload.analyze import attainment, instance_costs, summarize, ttft_ok


def ev(t, event, instance, **kw):
    return {"t": t, "event": event, "instance": instance, **kw}


def stage(rank, gb, all_card):
    return {"rank": rank, "node": "n", "gpu": 0, "gb": gb, "all_card": all_card}


EVENTS = [
    # A: a p = 2 pipeline; its part-card stage is freed at consolidation (t = 112)
    ev(100, "created", "A", model="m-0", p=2, stages=[stage(0, 18, True), stage(1, 9, False)]),
    ev(105, "ready", "A"),
    ev(110, "request_end", "A", model="m-0"),
    ev(112, "consolidated", "A", released=[1], split=[]),
    ev(120, "request_end", "A", model="m-0"),
    ev(160, "deleted", "A", state="stopped"),  # later than 30 s after its last token
    # B: never served, failed after 30 s
    ev(200, "created", "B", model="m-1", p=1, stages=[stage(0, 18, True)]),
    ev(230, "deleted", "B", state="failed"),
    # C: p = 3 with two all-card stages; rank 1 becomes instance D; both still held at the end
    ev(300, "created", "C", model="m-0", p=3,
       stages=[stage(0, 18, True), stage(1, 18, True), stage(2, 6, False)]),
    ev(310, "request_end", "C", model="m-0"),
    ev(315, "consolidated", "C", released=[2], split=[{"rank": 1, "instance": "D"}]),
    ev(320, "request_end", "D", model="m-0"),
]


def test_instance_costs_by_hand():
    costs = instance_costs(EVENTS, keep_alive_s=30)
    # A: 18 GB x (min(160, 120 + 30) - 100) + 9 GB x (112 - 100)
    assert costs["A"]["gbs"] == pytest.approx(18 * 50 + 9 * 12)
    assert costs["B"]["gbs"] == pytest.approx(18 * 30)  # never served: until deleted
    # C: head until 310 + 30; part-card rank 2 until consolidation; rank 1 (now D) until 320+30
    assert costs["C"]["gbs"] == pytest.approx(18 * 40 + 6 * 15 + 18 * 50)
    assert costs["C"]["model"] == "m-0" and set(costs) == {"A", "B", "C"}


def result(app, ttft, tpot=None, error=None, endpoint="m-0", slo=7.5, tpot_slo=200):
    return {"endpoint": endpoint, "model": "Llama2-7B", "application": app, "ttft_s": ttft,
            "tpot_ms": tpot, "error": error, "ttft_slo_s": slo, "tpot_slo_ms": tpot_slo}


RESULTS = [result("chatbot", 5.0, 100), result("chatbot", 9.0, 250),
           result("chatbot", None, error="no complete answer within 600 s"),
           result("summarization", None, error="HTTP 503", endpoint="m-1", slo=37.5)]


def test_attainment_counts_failures_as_violations():
    assert ttft_ok(RESULTS[0]) and not ttft_ok(RESULTS[1]) and not ttft_ok(RESULTS[2])
    got = attainment(RESULTS, ttft_ok)
    assert got == {"total": 25.0, "chatbot": pytest.approx(33.333, abs=1e-3),
                   "summarization": 0.0}
    assert list(got) == ["total", "chatbot", "summarization"]


def test_summary_has_attainment_cost_and_per_endpoint_figures():
    s = summarize(RESULTS, EVENTS, exec_type="hydraserve", cv=8, rate=0.6, source="real",
                  tpot_slo_scale=1.0)
    assert s["requests"] == 4 and s["answered"] == 2 and s["failed"] == 2
    assert s["tpot_attainment"]["chatbot"] == pytest.approx(33.333, abs=1e-3)
    total = 18 * 50 + 9 * 12 + 18 * 30 + 18 * 40 + 6 * 15 + 18 * 50
    assert s["cost_gbs_per_request"] == pytest.approx(total / 4, abs=1e-3)
    m0 = s["per_endpoint"]["m-0"]
    assert m0["requests"] == 3 and m0["tpot_ms_mean"] == pytest.approx(175)
    assert m0["cost_gbs_per_request"] == pytest.approx((total - 18 * 30) / 3, abs=1e-3)
    assert s["per_endpoint"]["m-1"]["cost_gbs_per_request"] == pytest.approx(540)
    loose = summarize(RESULTS, None, exec_type="x", cv=8, rate=0.6, source="real",
                      tpot_slo_scale=2.0)
    assert loose["tpot_attainment"]["chatbot"] == pytest.approx(66.667, abs=1e-3)
    assert loose["cost_gbs_per_request"] is None
    cpu = summarize(RESULTS, EVENTS, exec_type="x", cv=8, rate=0.6, source="real")
    assert cpu["tpot_attainment"] is None


def test_lifecycle_log_round_trip_and_torn_last_line(tmp_path):
    clock = iter([1.0, 2.0])
    log = LifecycleLog(tmp_path / "l.jsonl", clock=lambda: next(clock))
    log.write("created", instance="A", model="m", stages=[])
    log.write("deleted", instance="A", state="stopped")
    log.close()
    with open(tmp_path / "l.jsonl", "a") as f:
        f.write('{"t": 3, "event": "crea')  # a crash mid-write
    got = read_lifecycle(tmp_path / "l.jsonl")
    assert [(e["t"], e["event"]) for e in got] == [(1.0, "created"), (2.0, "deleted")]
    (tmp_path / "bad.jsonl").write_text('nope\n{"t": 1, "event": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_lifecycle(tmp_path / "bad.jsonl")
    assert json.loads((tmp_path / "l.jsonl").read_text().splitlines()[0])["instance"] == "A"
