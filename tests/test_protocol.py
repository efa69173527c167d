"""The typed messages between the control plane and its workers: every message round-trips
through JSON, a reader refuses what it cannot read, and the three worker implementations (ours,
the vLLM one, the simulator's) build the same `WorkerHealth`. Also the pure autoscaling rule on
a table of endpoint views."""
from __future__ import annotations

import asyncio
import json

import pytest

from hydraserve.control.autoscale import (AutoscaleConfig, Decision, EndpointView, InstanceView,
                                          decide)
from hydraserve.control.instance import InstanceState
from hydraserve.protocol import (EVENTS, PROTOCOL_VERSION, ErrorEvent, GenerateRequest, Peer,
                                 Phase, ProtocolError, RuntimeAssignment, TokenEvent,
                                 WorkerHealth, WorkerSpec, parse_event)

SPEC = WorkerSpec(worker_id="m-3-r1", model="m", node="n1", rank=1, p=2, layers=(2, 4),
                  all_card=False, num_kv_blocks=64, device="cuda", dtype="float16",
                  threads=2, late_attach=True, streaming_load=False, gpu_memory_gb=3.5,
                  engine="hydraserve")
HEALTH = WorkerHealth(Phase.READY, "m-3-r0", None, 41234, True,
                      {"spawned": 1.0, "weights_ready": 2.5}, running=3, waiting=1, steps=99,
                      aborted=2, kv_blocks=64, kv_blocks_free=40,
                      extra={"pid": 7, "layers": [0, 4]})


def wire(msg) -> dict:
    """What the other side reads: the message through a JSON text."""
    return json.loads(json.dumps(msg.to_json()))


@pytest.mark.parametrize("msg", [
    SPEC, Peer(1, "10.0.0.2", 5000), HEALTH, WorkerHealth(Phase.LOADING),
    GenerateRequest([1, 2, 3], {"max_tokens": 5, "temperature": 0.7, "seed": 11}, [9, 8]),
    GenerateRequest([4]), RuntimeAssignment(SPEC, "http://127.0.0.1:9000"),
], ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert type(msg).from_json(wire(msg)) == msg


@pytest.mark.parametrize("event", [TokenEvent(5), TokenEvent(7, "length"), TokenEvent(None, "stop"),
                                   ErrorEvent("boom"), ErrorEvent("bad request", 400),
                                   ErrorEvent("leaving", handover=True)])
def test_stream_events_round_trip(event):
    assert parse_event(wire(event)) == event


def test_health_keeps_the_fields_readers_use_flat():
    """Operators and old scripts read /health by key: the typed fields and the extra ones
    sit side by side in the JSON, with the protocol version."""
    d = wire(HEALTH)
    assert d["phase"] == "ready" and d["stage_port"] == 41234 and d["standalone"] is True
    assert d["pid"] == 7 and d["kv_blocks_free"] == 40 and d["protocol"] == PROTOCOL_VERSION
    assert HEALTH.has("weights_ready") and not HEALTH.has("consolidated")
    assert not HEALTH.ended and WorkerHealth(Phase.FAILED, error="x").ended


@pytest.mark.parametrize("cls,bad,why", [
    (WorkerHealth, {"phase": "ready", "protocol": PROTOCOL_VERSION + 1}, "protocol"),
    (WorkerHealth, {"phase": "dancing"}, "phase"),
    (WorkerHealth, {"stage_port": 1}, "lacks phase"),
    (WorkerHealth, ["ready"], "JSON object"),
    (Peer, {"rank": 0, "host": "h"}, "lacks stage_port"),
    (Peer, {"rank": "zero", "host": "h", "stage_port": 1}, "integers"),
    (WorkerSpec, {**SPEC.to_json(), "layers": [1]}, "layers"),
    (GenerateRequest, {"max_tokens": 3}, "prompt_ids"),
    (GenerateRequest, {"prompt_ids": ["a"]}, "integers"),
    (RuntimeAssignment, {"spec": SPEC.to_json(), "agent": 5}, "URL"),
])
def test_a_reader_refuses_what_it_cannot_read(cls, bad, why):
    with pytest.raises(ProtocolError, match=why):
        cls.from_json(bad)


def test_unknown_health_fields_are_kept_as_extra():
    """A newer worker may report more: an older reader keeps it, it does not fail."""
    h = WorkerHealth.from_json({"phase": "loading", "gpu_util": 0.5})
    assert h.phase is Phase.LOADING and h.extra == {"gpu_util": 0.5}


def test_the_simulated_worker_speaks_the_protocol():
    """The simulator's worker builds the same typed health, answers a long-poll of its
    timeline when the event happens (in virtual time), and streams typed events."""
    from hydraserve.config import ClusterConfig, ServerConfig
    from hydraserve.sim.cluster import SimCluster
    from hydraserve.sim.loop import run
    from hydraserve.sim.run import PAPER_SHAPES

    cfg = ClusterConfig(servers=(ServerConfig("a10-0", (24.0,), 16.0),))
    shape = PAPER_SHAPES["Llama2-7B"][0]
    cluster = SimCluster(cfg, {"m": shape})
    cluster.register_model("m", "sim:Llama2-7B")
    assert cluster.model_size_gb("m") == shape.size_gb and cluster.warm_pool() == {}
    spec = WorkerSpec(worker_id="w", model="m", node="a10-0", rank=0, p=1, layers=(0, 32),
                      all_card=True, num_kv_blocks=64)

    async def main():
        loop = asyncio.get_running_loop()
        await cluster.start_worker(spec)
        w = await cluster.wait_worker("w")
        early = await w.health()
        h = await w.wait_for("weights_ready", 600)
        waited = loop.time()
        await w.init([Peer(0, w.host, early.stage_port)])
        events = [ev async for ev in w.generate(GenerateRequest([1] * 8, {"max_tokens": 3}))]
        return early, h, waited, events

    early, h, waited, events = run(main())
    assert early.phase is Phase.LOADING and not early.has("weights_ready")
    assert h.has("weights_ready") and waited == pytest.approx(h.timeline["weights_ready"], abs=1e-3)
    assert events == [TokenEvent(0), TokenEvent(0), TokenEvent(0, "length")]
    assert list(EVENTS).index("weights_ready") < list(EVENTS).index("engine_ready")


@pytest.mark.parametrize("queued,instances,now,want", [
    (0, (), 0.0, Decision()),  # nothing to do
    (1, (), 0.0, Decision(start=1)),
    (17, (), 0.0, Decision(start=3)),  # ceil(17 / 8)
    # requests the starting instances will take are not asked for again
    (8, (InstanceView("a", InstanceState.STARTING, 8, 0, 0.0),), 0.0, Decision()),
    (9, (InstanceView("a", InstanceState.STARTING, 8, 0, 0.0),), 0.0, Decision(start=1)),
    # a pipeline of p = 2 starts with twice the slots
    (12, (InstanceView("a", InstanceState.STARTING, 16, 0, 0.0),), 0.0, Decision()),
    # keep-alive: idle past 60 s stops; busy, consolidating, or not ready does not
    (0, (InstanceView("a", InstanceState.READY, 8, 0, 0.0),), 60.0, Decision()),
    (0, (InstanceView("a", InstanceState.READY, 8, 0, 0.0),), 60.5, Decision(stop=("a",))),
    (0, (InstanceView("a", InstanceState.READY, 8, 1, 0.0),), 100.0, Decision()),
    (0, (InstanceView("a", InstanceState.READY, 8, 0, 0.0, consolidating=True),), 100.0,
     Decision()),
    (0, (InstanceView("a", InstanceState.STOPPING, 8, 0, 0.0),), 100.0, Decision()),
    # both at once: a queue on a model whose other instance sits idle (it has no free slot
    # only if it is not ready; a ready one would have taken the requests at dispatch)
    (3, (InstanceView("a", InstanceState.READY, 8, 0, 0.0),
         InstanceView("b", InstanceState.FAILED, 8, 0, 0.0)), 61.0, Decision(1, ("a",))),
])
def test_autoscale_decides_from_the_view_alone(queued, instances, now, want):
    cfg = AutoscaleConfig(batch_capacity=8, keep_alive_s=60.0)
    assert decide(EndpointView(queued, instances), now, cfg) == want
