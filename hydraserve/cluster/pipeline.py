"""One pipeline of worker processes on this machine, on a `LocalCluster` of its own (a store and
one storage agent per stage's emulated server): what ``hydraserve generate --processes`` runs,
and the tests and benchmarks use. The order of a cold start is the paper's: prefetch orders go
to the agents first, then the workers are spawned (all at once), then joined into a ring with
/init. The pipeline's own calls are blocking (`hydraserve.httpjson`) and carry the cluster
token of its config, which the processes it starts read from the environment they inherit.
"""
from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hydraserve.cluster.local import LocalCluster
from hydraserve.config import ClusterConfig, ServerConfig
from hydraserve.engine.config import EngineConfig, ModelConfig, num_kv_blocks
from hydraserve.httpjson import call, stream
from hydraserve.protocol import Peer, WorkerHealth, WorkerSpec
from hydraserve.store.image import ImageKind, ImageSpec
from hydraserve.store.launch import ServerProcess


@dataclass
class GroupConfig:
    model_dir: str
    p: int = 1
    all_card: tuple[int, ...] = (0,)  # ranks that reserve the whole model (may consolidate)
    nic_gbps: float | None = None  # per emulated server; None: unlimited
    engine: EngineConfig = field(default_factory=EngineConfig)
    threads_per_worker: int | None = None
    log_dir: str | None = None  # default: a temporary folder, removed at stop
    token: str | None = None  # the cluster token (what HYDRASERVE_CLUSTER_TOKEN is set to)


def _cluster_config(cfg: GroupConfig) -> ClusterConfig:
    """One emulated server per stage, ``node<rank>``; its NIC limit 0 is none at all."""
    servers = tuple(ServerConfig(name=f"node{r}", gpus=(), nic_gbps=cfg.nic_gbps or 0.0)
                    for r in range(cfg.p))
    return ClusterConfig(servers=servers, device=cfg.engine.device)


class LocalPipeline:
    def __init__(self, cfg: GroupConfig):
        self.cfg = cfg
        self.model_dir = Path(cfg.model_dir).resolve()
        self.name = re.sub(r"[^A-Za-z0-9._-]", "-", self.model_dir.name).lstrip(".-_") or "model"
        self.cluster = LocalCluster(_cluster_config(cfg), log_dir=cfg.log_dir, token=cfg.token)
        self.log_dir = self.cluster.log_dir
        self.stamps: dict[str, float] = {}
        self.layers: list[tuple[int, int]] = []
        self._ids: list[str] = []  # the started workers' ids, by rank

    def __enter__(self) -> "LocalPipeline":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the processes (the cluster's, looked up live: it restarts a store or agent that died)
    @property
    def store(self) -> ServerProcess | None:
        return self.cluster.store_process()

    @property
    def agents(self) -> list[ServerProcess]:
        return [self.cluster.agent_process(s.name) for s in self.cluster.nodes()]

    @property
    def workers(self) -> list[ServerProcess]:
        return [self.cluster.worker_process(wid) for wid in self._ids]

    # -- the cold start --------------------------------------------------------------------
    def start(self) -> None:
        self.stamps["start"] = time.time()
        self.cluster.register_model(self.name, str(self.model_dir))
        self.cluster.start()
        p = self.cfg.p
        layout = call(self.cluster.store_url(), "GET", f"/models/{self.name}/layout?p={p}",
                      token=self.cfg.token)
        self.layers = [tuple(s["layers"]) for s in layout["stages"]]
        self.stamps["prefetch_started"] = time.time()
        for r in range(p):
            call(self.cluster.agent_url(f"node{r}"), "POST", "/prefetch", self._image(r).to_dict(),
                 token=self.cfg.token)
        asyncio.run(self._spawn(self._specs()))
        self._init_ring()
        self.stamps["initialised"] = time.time()

    def _image(self, rank: int) -> ImageSpec:
        if self.cfg.p == 1:
            return ImageSpec(self.name, ImageKind.FULL)
        return ImageSpec(self.name, ImageKind.STAGE, self.cfg.p, rank)

    def _specs(self) -> list[WorkerSpec]:
        cfg, e = self.cfg, self.cfg.engine
        blocks = num_kv_blocks(ModelConfig.from_dir(self.model_dir), e)
        return [WorkerSpec(worker_id=f"{self.name}-r{r}", model=self.name, node=f"node{r}",
                           rank=r, p=cfg.p, layers=self.layers[r], all_card=r in cfg.all_card,
                           num_kv_blocks=blocks, device=e.device, dtype=e.dtype,
                           max_model_len=e.max_model_len, block_size=e.block_size,
                           max_num_seqs=e.max_num_seqs, threads=cfg.threads_per_worker)
                for r in range(cfg.p)]

    async def _spawn(self, specs: list[WorkerSpec]) -> None:
        """Start every worker through the cluster, then wait until each serves its API."""
        for s in specs:
            await self.cluster.start_worker(s)
            self._ids.append(s.worker_id)
        self.stamps["workers_spawned"] = time.time()
        await asyncio.gather(*(self.cluster.wait_worker(s.worker_id, 120) for s in specs))

    def _init_ring(self) -> None:
        """Tell every stage the ring (each stage's port from its /health), all at once: a
        stage's /init returns only once its neighbours are connected."""
        urls = [w.url for w in self.workers]
        healths = [WorkerHealth.from_json(call(url, "GET", "/health", token=self.cfg.token))
                   for url in urls]
        peers = [Peer(r, "127.0.0.1", h.stage_port).to_json() for r, h in enumerate(healths)]
        with ThreadPoolExecutor(len(urls)) as pool:
            done = [pool.submit(call, url, "POST", "/init", {"peers": peers}, timeout=60,
                                token=self.cfg.token)
                    for url in urls]
        errors = [f.exception() for f in done if f.exception() is not None]
        if errors:
            raise RuntimeError(f"pipeline init failed: {errors[0]}")

    # -- serving -------------------------------------------------------------------------------
    @property
    def head(self) -> str:
        return self.workers[0].url

    def generate(self, prompt_ids: list[int], **params) -> Iterator[dict]:
        """Stream {"token_id", "finish_reason"} items (or one {"error"}) from the head."""
        yield from stream(self.head, "/generate", {"prompt_ids": prompt_ids, **params},
                          token=self.cfg.token)

    def consolidate(self) -> None:
        for r in self.cfg.all_card:
            call(self.workers[r].url, "POST", "/consolidate", token=self.cfg.token)

    def health(self, rank: int) -> dict:
        return call(self.workers[rank].url, "GET", "/health", token=self.cfg.token)

    def timeline(self) -> dict[str, dict[str, float]]:
        """Seconds since start: the group's stamps and each live worker's timeline."""
        t0 = self.stamps["start"]
        out = {"group": {k: round(v - t0, 4) for k, v in self.stamps.items()}}
        for r, w in enumerate(self.workers):
            if w.proc.poll() is None:
                try:
                    tl = call(w.url, "GET", "/health", timeout=5, token=self.cfg.token)["timeline"]
                except Exception:  # noqa: BLE001 - a worker that just exited
                    continue
                out[f"rank{r}"] = {k: round(v - t0, 4) for k, v in tl.items()}
        return out

    def stop(self) -> None:
        """Ask each live worker to stop in order, then stop every process (the cluster signals
        those that did not) and free what the agents held."""
        for w in self.workers:
            if w.proc.poll() is None and w.url:
                try:
                    call(w.url, "POST", "/stop", timeout=5, token=self.cfg.token)
                except Exception:  # noqa: BLE001 - fall back to a signal
                    pass
        self.cluster.close()
