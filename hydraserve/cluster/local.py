"""The local backend: the whole cluster on this machine.

One remote store (models registered as links in its root), one storage agent per emulated server
(its NIC limit really enforced, its model cache in host memory), and workers as child processes.
GPU memory is a budget kept by the control plane's accounting.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
from pathlib import Path

from hydraserve.cluster.base import WorkerSpec, worker_args
from hydraserve.cluster.http import HttpApi, HttpServices, HttpWorker
from hydraserve.config import ClusterConfig, ServerConfig
from hydraserve.store.launch import ServerProcess

log = logging.getLogger("hydraserve.cluster")


class LocalCluster(HttpServices):
    def __init__(self, cfg: ClusterConfig, log_dir: str | None = None):
        self.cfg = cfg
        self._tmp = Path(tempfile.mkdtemp(prefix="hydraserve-cluster-"))
        self.log_dir = Path(log_dir) if log_dir else self._tmp / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.root = self._tmp / "store"
        self.root.mkdir()
        self._store: ServerProcess | None = None
        self._agents: dict[str, ServerProcess] = {}
        self._workers: dict[str, ServerProcess] = {}
        self._lock = threading.Lock()
        self._api = HttpApi()

    def start(self) -> None:
        scale = self.cfg.scale.size_scale
        egress = ["--egress-gbps", str(self.cfg.egress_gbps / scale)] if self.cfg.egress_gbps else []
        self._store = ServerProcess(["store", "serve", "--root", str(self.root), *egress],
                                    self.log_dir / "store.log")
        for s in self.cfg.servers:
            args = ["store", "agent", "--node", s.name, "--remote", self._store.url,
                    "--nic-gbps", str(s.nic_gbps / scale), "--cache-gb", str(s.cache_gb / scale)]
            self._agents[s.name] = ServerProcess(args, self.log_dir / f"agent-{s.name}.log",
                                                 wait=False)
        for a in self._agents.values():
            a.wait_ready()
        log.info("local cluster: store %s, %d agents", self._store.url, len(self._agents))

    def nodes(self) -> tuple[ServerConfig, ...]:
        return self.cfg.servers

    def store_url(self) -> str:
        return self._store.url

    def agent_url(self, node: str) -> str:
        return self._agents[node].url

    def agent_urls(self) -> dict[str, str]:
        return {name: a.url for name, a in self._agents.items()}

    def register_model(self, name: str, path: str) -> None:
        link = self.root / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(path).resolve())

    def unregister_model(self, name: str) -> None:
        link = self.root / name
        if link.is_symlink():
            link.unlink()

    # -- what the control plane calls on its loop (blocking steps run in an executor) ---------
    async def start_worker(self, spec: WorkerSpec) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._start_worker, spec)

    def _start_worker(self, spec: WorkerSpec) -> None:
        args = worker_args(spec, self.agent_url(spec.node))
        proc = ServerProcess(args, self.log_dir / f"worker-{spec.worker_id}.log", wait=False)
        with self._lock:
            self._workers[spec.worker_id] = proc

    async def wait_worker(self, worker_id: str, timeout: float = 120.0) -> HttpWorker:
        url = await asyncio.get_running_loop().run_in_executor(
            None, self._workers[worker_id].wait_ready, timeout)
        return HttpWorker(self._api, url)

    def worker_alive(self, worker_id: str) -> bool:
        proc = self._workers.get(worker_id)
        return proc is not None and proc.proc.poll() is None

    def worker_pid(self, worker_id: str) -> int:
        return self._workers[worker_id].proc.pid

    async def stop_worker(self, worker_id: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._stop_worker, worker_id)

    def _stop_worker(self, worker_id: str) -> None:
        with self._lock:
            proc = self._workers.pop(worker_id, None)
        if proc is not None:
            proc.stop(timeout=10)

    async def aclose(self) -> None:
        await self._api.close()

    def close(self) -> None:
        for wid in list(self._workers):
            self._stop_worker(wid)
        for a in self._agents.values():
            a.stop()
        if self._store:
            self._store.stop()
        shutil.rmtree(self.root, ignore_errors=True)
