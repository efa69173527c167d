"""The local backend: the whole cluster on this machine.

One remote store (models registered as links in its root), one storage agent per emulated server
(its NIC limit really enforced, its model cache in host memory), and workers as child processes.
GPU memory is a budget kept by the control plane's accounting. The store and the agents are
supervised: one that dies (killed, crashed) is started again on the port it had, so workers and
the control plane find it where it was; the shared memory a dead agent left is freed.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
from pathlib import Path

from hydraserve.cluster.base import WorkerSpec, worker_args
from hydraserve.cluster.http import HttpApi, HttpWorker
from hydraserve.config import ClusterConfig, ServerConfig
from hydraserve.store.agent import SHM_PREFIX
from hydraserve.store.launch import ServerProcess

log = logging.getLogger("hydraserve.cluster")


class LocalCluster:
    def __init__(self, cfg: ClusterConfig, log_dir: str | None = None, token: str | None = None):
        """``token``: the cluster token. The store, agents and workers started here inherit this
        process's environment, which is where they read it (the same one) from."""
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
        self._api = HttpApi(token)
        self._args: dict[str, list[str]] = {}  # "store" or a node name -> its command line
        self._revive_lock = threading.Lock()
        self._restarts = 0
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        scale = self.cfg.scale.size_scale
        egress = ["--egress-gbps", str(self.cfg.egress_gbps / scale)] if self.cfg.egress_gbps else []
        self._args["store"] = ["store", "serve", "--root", str(self.root), *egress]
        self._store = ServerProcess(self._args["store"], self.log_dir / "store.log")
        for s in self.cfg.servers:
            self._args[s.name] = ["store", "agent", "--node", s.name, "--remote", self._store.url,
                                  "--nic-gbps", str(s.nic_gbps / scale),
                                  "--cache-gb", str(s.cache_gb / scale)]
            self._agents[s.name] = ServerProcess(self._args[s.name],
                                                 self.log_dir / f"agent-{s.name}.log", wait=False)
        for a in self._agents.values():
            a.wait_ready()
        log.info("local cluster: store %s, %d agents", self._store.url, len(self._agents))
        self._watcher = threading.Thread(target=self._watch, name="cluster-watch", daemon=True)
        self._watcher.start()

    # -- supervision -------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._closing.wait(0.5):
            try:
                self.revive()
            except Exception:  # noqa: BLE001 - try again on the next round
                log.exception("restarting a dead store or agent failed")

    def revive(self) -> int:
        """Start again, on its old port, the store or any agent whose process died; free the
        segments a dead agent left. Returns how many were restarted."""
        restarted = 0
        with self._revive_lock:
            if self._closing.is_set():
                return 0
            if self._store is not None and self._store.proc.poll() is not None:
                self._store = self._restart("store", self._store, "store")
                restarted += 1
            for name, agent in list(self._agents.items()):
                if agent.proc.poll() is not None:
                    self._agents[name] = self._restart(name, agent, f"agent-{name}")
                    restarted += 1
        return restarted

    def _restart(self, key: str, old: ServerProcess, what: str) -> ServerProcess:
        code = old.stop()
        _free_segments(old.proc.pid)
        self._restarts += 1
        log.warning("%s (pid %d) died with status %s: restarting it on port %d", what,
                    old.proc.pid, code, old.port)
        return ServerProcess([*self._args[key], "--port", str(old.port)],
                             self.log_dir / f"{what}.{self._restarts}.log")

    async def _alive(self, proc: ServerProcess) -> None:
        if proc.proc.poll() is not None:  # dead: do not fail the call if it can come back
            await asyncio.get_running_loop().run_in_executor(None, self.revive)

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
    async def layout(self, model: str, p: int) -> list[tuple[int, int]]:
        await self._alive(self._store)
        body = await self._api.get(f"{self.store_url()}/models/{model}/layout?p={p}")
        return [tuple(s["layers"]) for s in body["stages"]]

    async def prefetch(self, node: str, model: str, kind: str, p: int, rank: int) -> None:
        await self._alive(self._agents[node])
        await self._api.post(self.agent_url(node) + "/prefetch",
                             {"model": model, "kind": kind, "p": p, "rank": rank})

    async def cached_models(self, node: str) -> set[str]:
        return set((await self._api.get(self.agent_url(node) + "/cache")).get("models", ()))

    async def warm_cache(self, model: str) -> None:
        await asyncio.gather(*(self.prefetch(s.name, model, "full", 1, 0)
                               for s in self.cfg.servers))
        for s in self.cfg.servers:
            url = self.agent_url(s.name)
            for r in (await self._api.get(url + "/regions"))["regions"]:
                if r["model"] == model:
                    await self._api.get(f"{url}/regions/{r['id']}?wait=1")

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
        self._closing.set()
        if self._watcher is not None:
            self._watcher.join(30)
        for wid in list(self._workers):
            self._stop_worker(wid)
        for a in self._agents.values():
            a.stop()
            _free_segments(a.proc.pid)  # nothing left unless it was killed
        if self._store:
            self._store.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _free_segments(agent_pid: int) -> None:
    """Unlink the shared-memory segments an agent process left behind (a killed agent cannot
    free its own). Readers still attached keep their mappings."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        for seg in shm.glob(f"{SHM_PREFIX}{agent_pid}_*"):
            try:
                seg.unlink()
            except OSError:
                pass
