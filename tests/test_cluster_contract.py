"""The cluster-backend contract: what the control plane may rely on from any backend, run
against each one: the local backend (real store, agents and worker processes, on the event
loop of asyncio.run), the Kubernetes backend's (worker pods created through the real
`kubernetes` client against the fake API server of tests/kubefake.py, whose kubelet runs the
store, the agents and every worker pod as local processes) and the simulator's (simulated
workers on the virtual-time loop, where any real I/O, thread or wall-clock read would fail the
test)."""
from __future__ import annotations

import asyncio
import time

import pytest

from hydraserve.cluster.base import ClusterBackend, WorkerError, WorkerSpec
from hydraserve.config import ClusterConfig, ScaleConfig, ServerConfig
from hydraserve.engine.config import EngineConfig, ModelConfig, num_kv_blocks
from hydraserve.protocol import GenerateRequest, Peer, TokenEvent

pytestmark = pytest.mark.multiprocess

CFG = ClusterConfig(servers=(ServerConfig("n0", (24.0,), 16.0, cache_gb=8.0),
                             ServerConfig("n1", (24.0,), 16.0, cache_gb=8.0)),
                    scale=ScaleConfig(size_scale=100.0))
BODY = GenerateRequest([5, 6, 7, 8], {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True})


def make_local(cfg: ClusterConfig) -> tuple[ClusterBackend, object]:
    from hydraserve.cluster.local import LocalCluster

    return LocalCluster(cfg), asyncio.run


def make_kubernetes(cfg: ClusterConfig) -> tuple[ClusterBackend, object]:
    """The backend against a fake API server (no real one can run here, see tests/kubefake.py);
    the model store's volume is a folder with the model linked in as ``m``."""
    import dataclasses
    import shutil
    import tempfile
    from pathlib import Path

    from kubefake import FakeKubernetes, hydraserve_nodes, start_hydraserve

    from hydraserve.cluster.kubernetes import KubernetesCluster, api_client
    from hydraserve.config import KubernetesConfig

    tmp = Path(tempfile.mkdtemp(prefix="hydraserve-kube-"))
    (tmp / "models").mkdir()
    fake = FakeKubernetes(hydraserve_nodes(cfg), tmp / "logs").start()
    kcfg = KubernetesConfig(store_url=None, grace_period_s=5)

    class Backend(KubernetesCluster):
        def register_model(self, name: str, path: str) -> None:
            (tmp / "models" / name).symlink_to(Path(path).resolve())  # the volume's content
            super().register_model(name, path)

        def close(self) -> None:
            try:
                super().close()
            finally:
                fake.close()
                shutil.rmtree(tmp, ignore_errors=True)

    try:
        start_hydraserve(fake, cfg, str(tmp / "models"))
        client = api_client(str(fake.write_kubeconfig(tmp / "kubeconfig")))
        backend = Backend(dataclasses.replace(cfg, kubernetes=kcfg), client)
    except BaseException:
        fake.close()
        raise
    backend.fake = fake
    return backend, asyncio.run


def make_sim(cfg: ClusterConfig) -> tuple[ClusterBackend, object]:
    from hydraserve.sim import loop
    from hydraserve.sim.cluster import SimCluster
    from hydraserve.sim.costmodel import CostModel, ModelShape

    cluster = SimCluster(cfg, {"m": ModelShape("m", 1.6, 4)}, CostModel.local_cpu())

    def run(coro):
        with loop.no_wall_clock(["hydraserve.sim.cluster", "hydraserve.sim.network"]):
            return loop.run(coro)

    return cluster, run


BACKENDS = {"local": make_local, "kubernetes": make_kubernetes, "sim": make_sim}


@pytest.fixture(params=sorted(BACKENDS), scope="module")
def backend_and_run(request, model_dirs):
    cluster, run = BACKENDS[request.param](CFG)
    try:
        cluster.start()
        cluster.register_model("m", model_dirs["llama"])
        yield cluster, run
    finally:
        cluster.close()


@pytest.fixture
def backend(backend_and_run):
    return backend_and_run[0]


@pytest.fixture
def run(backend_and_run):
    return backend_and_run[1]


def spec(worker_id: str, node: str, rank: int, p: int, layers, all_card: bool,
         model_dir: str) -> WorkerSpec:
    blocks = num_kv_blocks(ModelConfig.from_dir(model_dir), EngineConfig(kv_cache_mb=8))
    return WorkerSpec(worker_id=worker_id, model="m", node=node, rank=rank, p=p,
                      layers=tuple(layers), all_card=all_card, num_kv_blocks=blocks)


async def tokens(client, body=BODY) -> list[int]:
    out = []
    async for ev in client.generate(body):
        assert isinstance(ev, TokenEvent), ev
        out.append(ev.token_id)
        if ev.finish_reason:
            assert ev.finish_reason == "length"
    return out


async def start(backend, specs, prefetch: bool = True) -> list:
    if prefetch:
        await asyncio.gather(*(backend.prefetch(s.node, s.model, "full" if s.p == 1 else "stage",
                                                s.p, s.rank) for s in specs))
    for s in specs:
        await backend.start_worker(s)
    clients = await asyncio.gather(*(backend.wait_worker(s.worker_id, 120) for s in specs))
    healths = await asyncio.gather(*(c.health() for c in clients))
    peers = [Peer(s.rank, c.host, h.stage_port) for s, c, h in zip(specs, clients, healths)]
    await asyncio.gather(*(c.init(peers) for c in clients))
    return clients


def test_nodes_and_layouts(backend, run):
    assert [n.name for n in backend.nodes()] == ["n0", "n1"]

    async def main():
        for p in (1, 2, 3, 4):
            layers = await backend.layout("m", p)
            assert len(layers) == p and layers[0][0] == 0 and layers[-1][1] == 4
            assert all(a[1] == b[0] for a, b in zip(layers, layers[1:]))
        with pytest.raises(WorkerError):
            await backend.layout("no-such-model", 1)
        await backend.aclose()

    run(main())


def test_a_whole_model_worker_serves_refuses_and_stops(backend, run, model_dirs):
    async def main():
        s = spec("w-full", "n0", 0, 1, (0, 4), True, model_dirs["llama"])
        (client,) = await start(backend, [s])
        assert backend.worker_alive("w-full")
        # the cluster is the record: what runs is listed, with the spec it was started as
        listed = await backend.list_workers()
        assert list(listed) == ["w-full"] and (await listed["w-full"].health()).spec == s
        t0 = time.perf_counter()
        backend.renew_lease()  # on every tick of the control plane's loop: it never blocks
        assert time.perf_counter() - t0 < 0.05
        got = await tokens(client)
        assert len(got) == 6 and got == await tokens(client)  # greedy: the same again
        with pytest.raises(WorkerError) as bad:
            await tokens(client, GenerateRequest(BODY.prompt_ids, {**BODY.params, "max_tokens": -1}))
        assert bad.value.status == 400
        await client.stop()
        await backend.stop_worker("w-full")
        assert not backend.worker_alive("w-full")
        assert await backend.list_workers() == {}
        await backend.stop_worker("w-full")  # stopping twice is fine
        await backend.aclose()
        return got

    run(main())


def test_a_pipeline_gives_the_same_tokens_and_consolidates(backend, run, model_dirs):
    async def main():
        full = spec("w-ref", "n1", 0, 1, (0, 4), True, model_dirs["llama"])
        (ref,) = await start(backend, [full])
        want = await tokens(ref)
        await backend.stop_worker("w-ref")
        layers = await backend.layout("m", 2)
        specs = [spec(f"w-p{r}", f"n{r}", r, 2, layers[r], r == 0, model_dirs["llama"])
                 for r in range(2)]
        head, tail = await start(backend, specs)
        assert await tokens(head) == want
        for r in range(2):  # what each stage's fetch moved (the operator's view reads it)
            stats = await backend.fetch_stats(f"n{r}", "m", "stage", 2, r)
            assert stats["done"] and stats["received"] == stats["length"] > 0, stats
            assert stats["seconds"] >= 0
        assert await backend.fetch_stats("n0", "m", "stage", 3, 2) is None  # never fetched
        await head.consolidate()
        h = await head.wait_for("consolidated", 30)  # a long-poll: answered when it happens
        assert h.has("consolidated") and h.standalone, h
        await backend.stop_worker("w-p1")
        assert await tokens(head) == want  # alone now, same tokens
        await backend.stop_worker("w-p0")
        await backend.aclose()

    run(main())


def test_the_host_cache(backend, run):
    async def main():
        await backend.warm_cache("m")
        for n in backend.nodes():
            assert "m" in await backend.cached_models(n.name)
        await backend.aclose()

    run(main())
