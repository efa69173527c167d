"""A pipeline of worker processes on this machine, with its own remote store and one storage
agent per emulated server: what ``hydraserve generate --processes`` runs, and the tests and
benchmarks use. The order of a cold start is the paper's: prefetch orders go to the agents
first, then the workers are spawned (all at once), then joined into a ring with /init.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hydraserve.cluster.base import WorkerSpec, worker_args
from hydraserve.engine.config import EngineConfig, ModelConfig, num_kv_blocks
from hydraserve.httpjson import call, stream
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


class LocalPipeline:
    def __init__(self, cfg: GroupConfig):
        self.cfg = cfg
        self.model_dir = Path(cfg.model_dir).resolve()
        self.name = re.sub(r"[^A-Za-z0-9._-]", "-", self.model_dir.name).lstrip(".-_") or "model"
        self._tmp = tempfile.mkdtemp(prefix="hydraserve-")
        self.log_dir = Path(cfg.log_dir or self._tmp)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.store: ServerProcess | None = None
        self.agents: list[ServerProcess] = []
        self.workers: list[ServerProcess] = []
        self.stamps: dict[str, float] = {}
        self.layers: list[tuple[int, int]] = []

    def __enter__(self) -> "LocalPipeline":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self) -> None:
        cfg = self.cfg
        self.stamps["start"] = time.time()
        root = Path(self._tmp) / "store"
        root.mkdir()
        (root / self.name).symlink_to(self.model_dir)
        self.store = ServerProcess(["store", "serve", "--root", str(root)], self._log("store"))
        nic = ["--nic-gbps", str(cfg.nic_gbps)] if cfg.nic_gbps else []
        self.agents = [ServerProcess(["store", "agent", "--node", f"node{r}", "--remote",
                                      self.store.url, *nic], self._log(f"agent{r}"), wait=False)
                       for r in range(cfg.p)]
        for a in self.agents:
            a.wait_ready()
        layout = call(self.store.url, "GET", f"/models/{self.name}/layout?p={cfg.p}")
        self.layers = [tuple(s["layers"]) for s in layout["stages"]]
        self.stamps["prefetch_started"] = time.time()
        for r, agent in enumerate(self.agents):
            spec = ImageSpec(self.name, ImageKind.FULL) if cfg.p == 1 else \
                ImageSpec(self.name, ImageKind.STAGE, cfg.p, r)
            call(agent.url, "POST", "/prefetch", spec.to_dict())
        blocks = num_kv_blocks(ModelConfig.from_dir(self.model_dir), cfg.engine)
        e = cfg.engine
        for r in range(cfg.p):
            spec = WorkerSpec(worker_id=f"{self.name}-r{r}", model=self.name, node=f"node{r}",
                              rank=r, p=cfg.p, layers=self.layers[r], all_card=r in cfg.all_card,
                              num_kv_blocks=blocks, device=e.device, dtype=e.dtype,
                              max_model_len=e.max_model_len, block_size=e.block_size,
                              max_num_seqs=e.max_num_seqs, threads=cfg.threads_per_worker)
            args = worker_args(spec, self.agents[r].url)
            self.workers.append(ServerProcess(args, self._log(f"worker{r}"), wait=False))
        self.stamps["workers_spawned"] = time.time()
        for w in self.workers:
            w.wait_ready(120)
        peers = []
        for r, w in enumerate(self.workers):
            h = call(w.url, "GET", "/health")
            peers.append({"rank": r, "host": "127.0.0.1", "stage_port": h["stage_port"]})
        errors: list[Exception] = []

        def init(url: str) -> None:
            try:
                call(url, "POST", "/init", {"peers": peers}, timeout=60)
            except Exception as ex:  # noqa: BLE001 - re-raised below
                errors.append(ex)

        threads = [threading.Thread(target=init, args=(w.url,)) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"pipeline init failed: {errors[0]}")
        self.stamps["initialised"] = time.time()

    @property
    def head(self) -> str:
        return self.workers[0].url

    def generate(self, prompt_ids: list[int], **params) -> Iterator[dict]:
        """Stream {"token_id", "finish_reason"} items (or one {"error"}) from the head."""
        yield from stream(self.head, "/generate", {"prompt_ids": prompt_ids, **params})

    def consolidate(self) -> None:
        for r in self.cfg.all_card:
            call(self.workers[r].url, "POST", "/consolidate")

    def health(self, rank: int) -> dict:
        return call(self.workers[rank].url, "GET", "/health")

    def timeline(self) -> dict[str, dict[str, float]]:
        """Seconds since start: the group's stamps and each live worker's timeline."""
        t0 = self.stamps["start"]
        out = {"group": {k: round(v - t0, 4) for k, v in self.stamps.items()}}
        for r, w in enumerate(self.workers):
            if w.proc.poll() is None:
                try:
                    tl = call(w.url, "GET", "/health", timeout=5)["timeline"]
                except Exception:  # noqa: BLE001 - a worker that just exited
                    continue
                out[f"rank{r}"] = {k: round(v - t0, 4) for k, v in tl.items()}
        return out

    def stop(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                try:
                    call(w.url, "POST", "/stop", timeout=5)
                except Exception:  # noqa: BLE001 - fall back to a signal
                    pass
        for proc in [*self.workers, *self.agents] + ([self.store] if self.store else []):
            proc.stop()
        if self.cfg.log_dir is None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        else:
            shutil.rmtree(Path(self._tmp) / "store", ignore_errors=True)
