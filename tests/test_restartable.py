"""The parts that make the control plane restartable, each on its own: leases (a server whose
lease lapses exits by itself), the leader lock (it dies with its holder), the cluster record,
the local backend found again by a successor, the adoption rules (on the simulator's cluster,
whose workers report their specs as real ones do), and the lifecycle log across a takeover."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from aiohttp import web

from hydraserve.cluster.leader import FileLeadership
from hydraserve.cluster.record import ClusterRecord, Entry
from hydraserve.config import ClusterConfig, GatewayConfig, ModelConfigEntry, ServerConfig
from hydraserve.lease import Lease, from_args, renew_file
from hydraserve.protocol import WorkerSpec
from hydraserve.store.server import serve


# -- leases ---------------------------------------------------------------------------------------
def test_a_file_lease_lapses_after_its_grace_and_a_touch_renews_it(tmp_path):
    now = [1000.0]
    path = tmp_path / "lease"
    renew_file(path)
    os.utime(path, (now[0], now[0]))
    lease = Lease(5, path, clock=lambda: now[0])
    now[0] += 4.9
    assert not lease.lapsed()
    now[0] += 0.2
    assert lease.lapsed() and lease.age() == pytest.approx(5.1)
    os.utime(path, (now[0], now[0]))  # the control plane's tick
    assert not lease.lapsed()
    path.unlink()  # a missing file counts from when it was last seen
    now[0] += 5.5
    assert lease.lapsed()
    assert lease.args() == ["--orphan-grace", "5", "--lease", str(path)]


def test_an_in_memory_lease_and_the_flags():
    now = [0.0]
    lease = Lease(2, clock=lambda: now[0])
    now[0] = 3
    assert lease.lapsed()
    lease.renew()
    assert not lease.lapsed()
    with pytest.raises(ValueError):
        Lease(0)

    class Args:
        lease = None
        orphan_grace = None

    assert from_args(Args()) is None
    Args.orphan_grace = 7.0
    assert from_args(Args()).grace == 7 and from_args(Args()).path is None


def _serve_in_thread(lease: Lease) -> tuple[threading.Thread, list, list]:
    """``serve`` a bare app with ``lease`` on a thread: (thread, [url], [orphaned])."""
    url, result = [], []

    def main() -> None:
        async def run() -> None:
            app = web.Application()
            import contextlib
            import io

            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                task = asyncio.ensure_future(serve(app, "127.0.0.1", 0, "test server",
                                                   lease=lease))
                while "listening on" not in out.getvalue() and not task.done():
                    await asyncio.sleep(0.01)
            url.append(out.getvalue().split("listening on ")[1].split()[0])
            result.append(await task)

        loop = asyncio.new_event_loop()
        loop.add_signal_handler = lambda *a: None  # not the main thread: no signal handlers
        loop.remove_signal_handler = lambda *a: None
        try:
            loop.run_until_complete(run())
        finally:
            loop.close()

    t = threading.Thread(target=main, daemon=True)
    t.start()
    return t, url, result


def test_a_server_whose_lease_lapses_exits_and_post_lease_renews_it(monkeypatch):
    import hydraserve.store.server as server

    monkeypatch.setattr(server, "quiet_exit", lambda loop: None)  # not the main thread
    monkeypatch.setattr(server, "CHECK_EVERY_S", 0.1)
    lease = Lease(1.0)
    t, url, result = _serve_in_thread(lease)
    deadline = time.monotonic() + 10
    while not url and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(6):  # renewed for 1.8 s: it must stay
        req = urllib.request.Request(url[0] + "/lease", method="POST", data=b"")
        assert json.loads(urllib.request.urlopen(req, timeout=5).read())["renewed"]
        time.sleep(0.3)
    assert t.is_alive()
    t.join(5)  # and once no longer renewed, it leaves by itself
    assert not t.is_alive() and result == [True]


# -- the leader lock ------------------------------------------------------------------------------
def test_one_leader_a_standby_waits_and_takes_over_at_release(tmp_path):
    a, b = FileLeadership(tmp_path, "gateway a"), FileLeadership(tmp_path, "gateway b")
    assert a.try_acquire() and not b.try_acquire()
    assert b.holder() == "gateway a" and not a.standby_waiting()
    stop, got = threading.Event(), []
    waiter = threading.Thread(target=lambda: got.append(b.acquire(stop)), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 5
    while not a.standby_waiting() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.standby_waiting()
    a.release()
    released = time.monotonic()
    waiter.join(5)
    assert got == [True] and b.held() and time.monotonic() - released < 1.0
    assert a.holder() == "gateway b" and not b.standby_waiting()
    b.release()
    stop.set()


def test_the_leader_lock_dies_with_its_holder(tmp_path):
    code = ("import sys, time; from hydraserve.cluster.leader import FileLeadership; "
            "l = FileLeadership(sys.argv[1], 'child'); assert l.try_acquire(); "
            "print('leading', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "leading"
        me = FileLeadership(tmp_path, "me")
        assert not me.try_acquire() and me.holder() == "child"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert me.try_acquire()  # no timeout to wait for: the kernel released it
        me.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_a_standby_that_stops_waiting_is_no_standby(tmp_path):
    a, b = FileLeadership(tmp_path, "a"), FileLeadership(tmp_path, "b")
    assert a.try_acquire()
    stop = threading.Event()
    stop.set()
    assert b.acquire(stop) is False
    assert not a.standby_waiting()
    a.release()


# -- the cluster record ---------------------------------------------------------------------------
def test_the_record_round_trips_and_is_written_whole(tmp_path):
    rec = ClusterRecord(tmp_path / "record.json")
    assert rec.load() is False
    spec = WorkerSpec("w", "m", "n0", 0, 1, (0, 4), True, 8, instance="m-0", gpu=1, claim_gb=6)
    rec.set_store(Entry(1, "http://s", ["store", "serve"]))
    rec.set_agent("n0", Entry(2, "http://a", ["store", "agent"]))
    rec.set_worker("w", Entry(3, "http://w", spec=spec.to_json()))
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left
    again = ClusterRecord(tmp_path / "record.json")
    assert again.load() and again.store.pid == 1 and again.agents["n0"].url == "http://a"
    assert WorkerSpec.from_json(again.workers["w"].spec) == spec
    rec.set_worker("w", None)
    assert again.load() and again.workers == {}
    (tmp_path / "record.json").write_text("{not json")
    assert again.load() is False
    rec.remove()
    assert not (tmp_path / "record.json").exists()


# -- the local backend, found again ---------------------------------------------------------------
CFG = ClusterConfig(servers=(ServerConfig("n0", (24.0,), 16.0), ServerConfig("n1", (24.0,), 16.0)))


@pytest.mark.multiprocess
def test_a_successor_adopts_the_local_cluster_and_a_changed_one_is_restarted(tmp_path,
                                                                             model_dirs):
    from hydraserve.cluster.local import LocalCluster
    from tests.test_cluster_contract import spec as make_spec, start

    home = tmp_path / "home"
    first = LocalCluster(CFG, str(tmp_path / "logs"), home=home)
    first.start()
    first.register_model("m", model_dirs["llama"])
    s = make_spec("w0", "n0", 0, 1, (0, 4), True, model_dirs["llama"])
    pids = {"store": first.store_process().proc.pid,
            **{n: first.agent_process(n).proc.pid for n in ("n0", "n1")}}

    async def begin():
        await start(first, [s])
        await first.aclose()

    asyncio.run(begin())
    worker_pid = first.worker_pid("w0")
    first.detach()
    changed = ClusterConfig(servers=(ServerConfig("n0", (24.0,), 16.0),
                                     ServerConfig("n1", (24.0,), 8.0)))  # another NIC on n1
    second = LocalCluster(changed, str(tmp_path / "logs"), home=home)
    try:
        second.start()
        assert second.adopted_services == 2  # the store and n0's agent; n1's was restarted
        assert second.store_process().proc.pid == pids["store"]
        assert second.agent_process("n0").proc.pid == pids["n0"]
        assert second.agent_process("n1").proc.pid != pids["n1"]

        async def listed():
            workers = await second.list_workers()
            health = await workers["w0"].health()
            await second.aclose()
            return workers, health

        workers, health = asyncio.run(listed())
        assert list(workers) == ["w0"] and health.spec == s and second.worker_alive("w0")
        assert second.worker_pid("w0") == worker_pid
    finally:
        second.close()
    from tests.faults import alive

    deadline = time.monotonic() + 20
    while any(alive(p) for p in (*pids.values(), worker_pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in (*pids.values(), worker_pid) if alive(p)]
    assert not (home / "record.json").exists()  # a clean stop leaves nothing to adopt


# -- the adoption rules, on the simulator's cluster -----------------------------------------------
def test_adoption_keeps_what_serves_and_stops_the_rest():
    from hydraserve.control.controller import Controller
    from hydraserve.engine.config import Arch, ModelConfig
    from hydraserve.sim import loop
    from hydraserve.sim.cluster import SimCluster
    from hydraserve.sim.costmodel import CostModel, ModelShape

    cfg = ClusterConfig(servers=tuple(ServerConfig(f"n{i}", (24.0,), 16.0) for i in range(4)))
    shapes = {"m": ModelShape("m", 4.0, 4), "gone": ModelShape("gone", 4.0, 4)}
    model_cfg = ModelConfig(Arch.LLAMA, 512, 64, 4, 4, 2, 16, 128, 256)
    gw = GatewayConfig(port=0, batch_capacity=8, keep_alive_s=3600)

    def ws(wid, inst, node, rank, p, layers, all_card, model="m"):
        return WorkerSpec(wid, model, node, rank, p, layers, all_card, 8, instance=inst,
                          claim_gb=9.0)

    async def main():
        cluster = SimCluster(cfg, shapes, CostModel.local_cpu())
        for name in shapes:
            cluster.register_model(name, f"sim:{name}")
        ready = [ws("a-r0", "m-3", "n0", 0, 1, (0, 4), True),  # a whole model
                 ws("b-r0", "m-5", "n1", 0, 2, (0, 2), True),  # a whole pipeline
                 ws("b-r1", "m-5", "n2", 1, 2, (2, 4), False),
                 ws("c-r0", "m-7", "n3", 0, 2, (0, 2), False),  # rank 1 is missing
                 ws("d-r0", "gone-9", "n3", 0, 1, (0, 4), True, model="gone"),  # unregistered
                 ws("f-r0", "m-11", "n0", 0, 2, (0, 2), True),  # a pipeline consolidating
                 ws("f-r1", "m-11", "n1", 1, 2, (2, 4), False)]
        for s in ready:
            await cluster.start_worker(s)
        await asyncio.gather(*(cluster.wait_worker(s.worker_id) for s in ready))
        for w in ("b-r0", "b-r1", "c-r0", "f-r0", "f-r1"):
            await cluster.workers[w].init([])
        while any(cluster.workers[s.worker_id].state != "ready" for s in ready):
            await asyncio.sleep(0.5)
        await cluster.workers["f-r0"].consolidate()  # the dead control plane's order
        await cluster.start_worker(ws("e-r0", "m-8", "n2", 0, 1, (0, 4), True))  # loading
        c = Controller.build(cluster, cfg, gw, clock=asyncio.get_running_loop().time,
                             lifecycle_clock=asyncio.get_running_loop().time)
        c.register(ModelConfigEntry("m", "sim:m", size_gb=4.0), model_cfg)
        await c.start()
        out = {i.id: (len(i.stages), i.state.value, i.placement.consolidate)
               for i in c.list_instances()}
        alive = sorted(await cluster.list_workers())
        gb = sum(cl.gb for cl in c.state.gpus.claims())
        new = c.state.new_id("m")
        await asyncio.sleep(600)  # the consolidation it found under way finishes
        merged = c.instance("m-11")
        after = (len(merged.stages), merged.consolidated, sorted(await cluster.list_workers()))
        await c.close()
        return out, alive, gb, new, after

    with loop.no_wall_clock(["hydraserve.control.adoption", "hydraserve.sim.cluster"]):
        out, alive, gb, new, after = loop.run(main())
    assert out == {"m-3": (1, "ready", False), "m-5": (2, "ready", True),
                   "m-11": (2, "ready", True)}
    assert alive == ["a-r0", "b-r0", "b-r1", "f-r0", "f-r1"]  # the rest were stopped
    assert gb == 45.0  # the ledger holds the adopted claims exactly
    assert new == "m-12"  # new instances are numbered past the adopted ones
    assert after[:2] == (1, True) and "f-r1" not in after[2]  # its consolidation finished


def test_the_lifecycle_log_accounts_an_adopted_instance_whole(tmp_path):
    from hydraserve.control.lifecycle import LifecycleLog, read_lifecycle
    from hydraserve.workload.analyze import instance_costs

    path = tmp_path / "life.jsonl"
    now = [0.0]
    first = LifecycleLog(path, clock=lambda: now[0])
    first.write("created", instance="m-0", model="m", p=2, policy="x", from_cache=False,
                stages=[{"rank": 0, "node": "n0", "gpu": 0, "gb": 10, "all_card": True},
                        {"rank": 1, "node": "n1", "gpu": 0, "gb": 5, "all_card": True}])
    now[0] = 10
    first.write("consolidated", instance="m-0", released=[], split=[{"rank": 1,
                                                                      "instance": "m-1"}])
    first._file.write('{"t": 11, "event": "request_')  # the leader is killed mid-line
    first._file.flush()
    now[0] = 20  # the successor adopts both halves and deletes them later
    second = LifecycleLog(path, clock=lambda: now[0])
    late = LifecycleLog(path, clock=lambda: now[0])  # a standby's, made before it leads
    second.write("adopted", instance="m-0", model="m", p=1, stages=[
        {"rank": 0, "node": "n0", "gpu": 0, "gb": 10, "all_card": True, "created": "m-0",
         "created_rank": 0}])
    second.write("adopted", instance="m-0.r1", model="m", p=1, stages=[
        {"rank": 0, "node": "n1", "gpu": 0, "gb": 5, "all_card": True, "created": "m-0",
         "created_rank": 1}])
    now[0] = 30
    second.write("deleted", instance="m-0", state="stopped", error=None)
    now[0] = 40
    second.write("deleted", instance="m-0.r1", state="stopped", error=None)
    second._file.write('{"t": 40.5, "event": "req')
    second._file.flush()
    now[0] = 41
    late.write("ready", instance="m-9")  # after a successor that died mid-line too
    events = read_lifecycle(path)[:-1]
    assert [e["event"] for e in events] == ["created", "consolidated", "adopted", "adopted",
                                            "deleted", "deleted"]
    costs = instance_costs(events)
    assert costs["m-0"]["gbs"] == pytest.approx(10 * 30 + 5 * 40)
