"""The fault suite: real processes killed at the worst moments while real requests run. Every
case counts the requests it sent and how each ended: answered, failed with a clear error (an
error status, or an SSE error event), or lost (hung past its bound, or cut without a final
event). No request may be lost. The table of counts is printed in the run's summary."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from hydraserve.make_model import ModelSpec, make_model
from hydraserve.store.launch import ServerProcess
from tests.faults import TABLE, Counts, Outcome, Rig, ask, ask_many, kill

pytestmark = [pytest.mark.faults, pytest.mark.multiprocess]

BOUND = 60.0  # seconds any one request may stay silent before it counts as lost


def _body(max_tokens: int = 8, stream: bool = True, model: str = "m", **kw) -> dict:
    return {"model": model, "prompt": "hello there", "max_tokens": max_tokens, "stream": stream,
            "ignore_eos": True, **kw}


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> str:
    """16 MB: its fetch takes seconds on a slow emulated NIC (time to kill things during it)."""
    tmp = tmp_path_factory.mktemp("faults-models")
    return str(make_model(tmp / "big", ModelSpec(arch="llama", hidden=256, layers=4, vocab=2048,
                                                 seed=9)))


@pytest.fixture
def rig_factory(tmp_path):
    rigs: list[Rig] = []

    def make(**kw) -> Rig:
        rig = Rig(tmp_path / f"rig{len(rigs)}", **kw)
        rigs.append(rig)
        return rig

    yield make
    left = []
    for rig in rigs:
        rig.close()
        left += rig.leftovers()
    assert not left, left


def _record(case: str, counts: Counts, fixed: str) -> None:
    TABLE[case] = (counts, fixed)
    assert counts.lost == 0, counts.notes


def _in_background(url: str, bodies: list[dict], **kw) -> tuple[list[threading.Thread], list]:
    out: list[Outcome | None] = [None] * len(bodies)

    def run(i: int, body: dict) -> None:
        out[i] = ask(url, body, BOUND, **kw)

    threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    return threads, out


def _join(threads: list[threading.Thread], out: list) -> list[Outcome]:
    for t in threads:
        t.join(BOUND * 3)
    return [o if o is not None else Outcome("lost", "the client thread hung") for o in out]


# -- a. a worker killed during its cold start --------------------------------------------------
def test_worker_killed_during_cold_start_is_placed_again(rig_factory, model_dirs):
    rig = rig_factory(models={"m": model_dirs["llama"]})
    counts = Counts()
    # round 1: killed while it imports (before it serves); round 2: as soon as it serves
    for when in ("spawned", "serving"):
        threads, out = _in_background(rig.url, [_body(), _body(stream=False)])
        inst = rig.wait_for(lambda: rig.instances("m") and rig.instances("m")[0])
        stage = inst.stages[0]
        rig.wait_for(lambda: rig.cluster.worker_alive(stage.worker_id))
        if when == "serving":
            rig.wait_for(lambda: stage.client is not None, every=0.005)
        else:
            time.sleep(0.3)
        kill(rig.cluster.worker_pid(stage.worker_id))
        results = _join(threads, out)
        counts.add(results)
        assert [r.kind for r in results] == ["answered", "answered"], results
        assert rig.controller.model("m").cold_starts >= 2  # a new placement served them
        rig.scale_to_zero("m")  # cold again for the next round
    _record("a. worker SIGKILLed during its cold start", counts,
            "requests whose instance fails before their first token are queued again")


# -- b. a stage killed mid-stream ------------------------------------------------------------
def _seeded(i: int, n: int = 300) -> dict:
    return _body(n, temperature=0.9, seed=100 + i)


def _warm_instance(rig: Rig, mode: str):
    """Warm the model in ``mode`` (p1, p2 or consolidated); return its instance."""
    counts = Counts()
    counts.add(ask_many(rig.url, [_body(4)], BOUND))
    inst = rig.instances("m")[0]
    if mode == "consolidated":
        rig.wait_for(lambda: "consolidated" in inst.timeline, timeout=BOUND)
        assert inst.consolidated and len(inst.stages) == 1
    return inst, counts


def _identical_through(rig: Rig, n: int, fault) -> list[Outcome]:
    """Send n seeded sampling streams once undisturbed, then again with ``fault()`` called
    once they flow: every stream of the second round must be answered with the same text (no
    token lost or doubled). Returns both rounds' outcomes."""
    reference = ask_many(rig.url, [_seeded(i) for i in range(n)], BOUND)
    assert [r.kind for r in reference] == ["answered"] * n, reference
    flowing = threading.Event()
    threads, out = _in_background(rig.url, [_seeded(i) for i in range(n)], on_token=flowing,
                                  token_mark=3)
    assert flowing.wait(BOUND)
    fault()
    results = _join(threads, out)
    assert [r.kind for r in results] == ["answered"] * n, results
    assert [r.text for r in results] == [r.text for r in reference]
    return reference + results


RIGS = {  # mode -> the rig that gives it (see each comment)
    "p1": dict(static_p=1),  # static(1): one standalone worker
    "p2": dict(sizes={"m": 20.0}, static_p=2),  # static(2), no consolidation
    # p = 2 meets a 2.5 s TTFT SLO and p = 1 does not: one all-card stage, which consolidates
    "consolidated": dict(servers=4, ttft_slo_s=2.5),
}


@pytest.mark.parametrize("mode", list(RIGS))
def test_stage_killed_mid_stream_streams_continue_identically(rig_factory, big_model, mode):
    rig = rig_factory(models={"m": big_model}, **RIGS[mode])
    inst, counts = _warm_instance(rig, mode)
    assert len(inst.stages) == (2 if mode == "p2" else 1)
    victim = inst.stages[-1]  # p2: the last stage; otherwise the only one
    counts.add(_identical_through(
        rig, 3, lambda: kill(rig.cluster.worker_pid(victim.worker_id))))
    assert rig.controller.model("m").resumed >= 1
    after = ask_many(rig.url, [_body(8), _body(8, stream=False)], BOUND)
    counts.add(after)
    assert [r.kind for r in after] == ["answered", "answered"], after
    _record(f"b. stage SIGKILLed mid-stream ({mode})", counts,
            "streams resume on another instance from the tokens already sent")


def test_server_lost_with_its_agent_and_workers(rig_factory, big_model):
    """A server goes away: its agent and its worker die together mid-stream. The streams
    continue, identical, on an instance elsewhere (the local backend restarts the agent)."""
    rig = rig_factory(models={"m": big_model}, static_p=1)
    inst, counts = _warm_instance(rig, "p1")
    node = inst.stages[0].node
    agent = rig.cluster._agents[node]

    def lose_the_server() -> None:
        kill(rig.cluster.worker_pid(inst.stages[0].worker_id))
        kill(agent.proc.pid)

    counts.add(_identical_through(rig, 2, lose_the_server))
    rig.note_agents()
    assert rig.cluster._agents[node].proc.pid != agent.proc.pid
    assert rig.cluster._agents[node].url == agent.url  # restarted where it was
    _record("g. a server's agent and worker SIGKILLed mid-stream", counts,
            "streams resume elsewhere; the agent is restarted")


def test_sigterm_to_a_worker_hands_its_streams_over(rig_factory, big_model):
    """A planned stop (a spot-style preemption notice): SIGTERM to the serving worker. It hands
    each open stream over (a handover item, not a cut) and exits; the streams continue, identical,
    on a new instance."""
    rig = rig_factory(models={"m": big_model}, static_p=1)
    inst, counts = _warm_instance(rig, "p1")
    worker = rig.cluster._workers[inst.stages[0].worker_id]
    counts.add(_identical_through(rig, 2, lambda: kill(worker.proc.pid, signal.SIGTERM)))
    assert worker.proc.wait(30) == 0  # it left in order
    log = worker.log_path.read_text()
    assert "handed 2 stream(s) over" in log, log[-2000:]
    _record("h. serving worker SIGTERMed (planned stop) mid-stream", counts,
            "the worker hands its streams over; they resume elsewhere")


# -- c. the storage agent killed during a prefetch --------------------------------------------
def test_agent_killed_during_prefetch_is_restarted(rig_factory, big_model):
    rig = rig_factory(models={"m": big_model}, nic_gbps=4)  # 16 MB at 5 MB/s: ~3 s of fetch
    threads, out = _in_background(rig.url, [_body(8), _body(8, stream=False)])
    inst = rig.wait_for(lambda: rig.instances("m") and rig.instances("m")[0])
    rig.wait_for(lambda: "prefetch_started" in inst.timeline)
    node = inst.stages[0].node
    agent = rig.cluster._agents[node]
    time.sleep(1.0)
    kill(agent.proc.pid)
    counts = Counts()
    results = _join(threads, out)
    counts.add(results)
    # the worker loading from the dead agent fails; its requests had no token yet: placed again
    assert [r.kind for r in results] == ["answered", "answered"], results
    rig.note_agents()
    assert rig.cluster._agents[node].proc.pid != agent.proc.pid  # restarted ...
    assert rig.cluster._agents[node].url == agent.url  # ... where it was
    assert not list(Path("/dev/shm").glob(f"hs_{agent.proc.pid}_*"))  # its segments freed
    after = ask_many(rig.url, [_body(8)], BOUND)
    counts.add(after)
    assert [r.kind for r in after] == ["answered"], after
    _record("c. storage agent SIGKILLed during a prefetch", counts,
            "the local backend restarts a dead agent on its port and frees its segments")


# -- d. the model store killed (and restarted) during a fetch ---------------------------------
def test_store_killed_during_fetch_and_fetches_resume(rig_factory, big_model):
    rig = rig_factory(models={"m": big_model}, nic_gbps=4)
    threads, out = _in_background(rig.url, [_body(8), _body(8, stream=False)])
    inst = rig.wait_for(lambda: rig.instances("m") and rig.instances("m")[0])
    rig.wait_for(lambda: "prefetch_started" in inst.timeline)
    store = rig.cluster._store
    time.sleep(1.0)
    kill(store.proc.pid)
    counts = Counts()
    results = _join(threads, out)
    counts.add(results)
    assert [r.kind for r in results] == ["answered", "answered"], results
    assert rig.cluster._store.proc.pid != store.proc.pid and rig.cluster._store.url == store.url
    logs = "".join(p.read_text() for p in (rig.tmp / "logs").glob("agent-*.log"))
    assert "resuming" in logs  # the fetch went on from where it was cut
    after = ask_many(rig.url, [_body(8)], BOUND)
    counts.add(after)
    assert [r.kind for r in after] == ["answered"], after
    _record("d. model store SIGKILLed (restarted) during a fetch", counts,
            "the store restarts on its port; agents retry a cut range for 30 s")


# -- e. a consolidation that fails -------------------------------------------------------------
def test_failed_consolidation_loses_no_request(rig_factory, big_model):
    # p = 2 meets a 2.5 s TTFT SLO and p = 1 does not: one all-card stage, consolidating
    rig = rig_factory(models={"m": big_model}, servers=4, ttft_slo_s=2.5)
    first = threading.Event()
    threads, out = _in_background(rig.url, [_body(1000) for _ in range(4)], on_token=first)
    inst = rig.wait_for(lambda: rig.instances("m") and rig.instances("m")[0])
    assert inst.placement.p == 2 and inst.placement.consolidate
    part = next(s for s in inst.stages if not s.all_card)
    rig.wait_for(lambda: "consolidation_started" in inst.timeline, every=0.002)
    in_flight = sum(o is None for o in out)
    kill(rig.cluster.worker_pid(part.worker_id))
    counts = Counts()
    results = _join(threads, out)
    counts.add(results)
    assert in_flight > 0  # the fault hit streams that were running
    assert "consolidated" not in inst.timeline
    assert [r.kind for r in results] == ["answered"] * 4, results  # resumed elsewhere
    after = ask_many(rig.url, [_body(8), _body(8, stream=False), _body(8)], BOUND)
    counts.add(after)
    assert [r.kind for r in after] == ["answered"] * 3, after
    _record("e. part-card stage SIGKILLed during consolidation", counts,
            "its streams resume on a new instance from the tokens already sent")


# -- i. an instance stopped in the middle of its consolidation ----------------------------------
def test_a_stop_during_consolidation_ends_cleanly(rig_factory, big_model):
    """The control plane stops a consolidating instance (as scale-down or a model removal
    would): the workers hand their streams over and leave without a traceback (the region the
    consolidation reads is closed by its own thread, not pulled from under it), and the streams
    finish on a new instance."""
    rig = rig_factory(models={"m": big_model}, servers=4, ttft_slo_s=2.5)
    threads, out = _in_background(rig.url, [_seeded(i, 600) for i in range(2)])
    inst = rig.wait_for(lambda: rig.instances("m") and rig.instances("m")[0])
    assert inst.placement.consolidate
    rig.wait_for(lambda: "consolidation_started" in inst.timeline, every=0.002)
    rig.call(rig.controller.stop_instance(inst.id))
    counts = Counts()
    results = _join(threads, out)
    counts.add(results)
    assert [r.kind for r in results] == ["answered"] * 2, results
    logs = {p.name: p.read_text() for s in inst.stages
            for p in [rig.tmp / "logs" / f"worker-{s.worker_id}.log"]}
    assert all("Traceback" not in text for text in logs.values()), logs
    _record("i. instance stopped during its consolidation", counts,
            "the reading thread closes its region; streams handed over and resumed")


# -- f. the gateway stopped while streams are open ---------------------------------------------
def test_sigterm_ends_open_streams_and_leaves_nothing(tmp_path, model_dirs, big_model):
    from tests.faults import alive, descendants

    cluster = {"device": "cpu", "scale": {"size_scale": 100, "after_fetch_ms": 2000},
               "servers": [{"name": f"s{i}", "gpus": [24], "nic_gbps": 2} for i in range(2)]}
    models = {"models": [{"name": "m", "path": model_dirs["llama"], "ttft_slo_s": 30},
                         {"name": "cold", "path": big_model, "ttft_slo_s": 30}]}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    server = ServerProcess(["serve", "--cluster", str(tmp_path / "cluster.yaml"), "--models",
                            str(tmp_path / "models.yaml"), "--port", "0", "--shutdown-grace", "2",
                            "--sse-heartbeat", "0", "--log-dir", str(tmp_path / "logs")],
                           tmp_path / "gateway.log")
    procs: set[int] = set()
    try:
        counts = Counts()
        counts.add(ask_many(server.url, [_body(4)], BOUND))  # m is warm
        flowing = threading.Event()
        # three long streams on the warm model, one waiting for the cold one (16 MB at 2.5 MB/s)
        bodies = [_body(1000) for _ in range(3)] + [_body(8, model="cold")]
        threads, out = _in_background(server.url, bodies, on_token=flowing, token_mark=2)
        assert flowing.wait(BOUND)
        time.sleep(0.5)
        procs = descendants(server.proc.pid)
        assert len(procs) >= 4  # the store, two agents, a worker at least
        stopped_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        results = _join(threads, out)
        counts.add(results)
        assert all(r.kind != "lost" and r.ended - stopped_at < 2 + 5 for r in results), results
        assert results[-1].kind == "error" and "shutting down" in results[-1].detail
        assert server.proc.wait(60) == 0
        left = [p for p in procs if alive(p)]
        assert not left, left
        segments = [s.name for p in procs for s in Path("/dev/shm").glob(f"hs_{p}_*")]
        assert not segments, segments
        _record("f. gateway SIGTERMed with streams open", counts,
                "drain on SIGTERM: a grace period, then a 503 error event to each open request")
    finally:
        server.stop()
        for p in procs:  # only if the test failed: what the gateway left
            if alive(p):
                kill(p)
