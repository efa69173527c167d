"""The local backend: the whole cluster on this machine.

One remote store (models registered as links in its root), one storage agent per emulated server
(its NIC limit really enforced, its model cache in host memory), and workers as child processes.
GPU memory is a budget kept by the control plane's accounting. The store and the agents are
supervised: one that dies (killed, crashed) is started again on the port it had, so workers and
the control plane find it where it was; the shared memory a dead agent left is freed.

The cluster is the record: its folder (``home``) holds a record of the processes that run
(`record`) and a lease file that the control plane touches on its tick. Every process started
here holds that lease and exits by itself once it was not renewed for the orphan grace
(`hydraserve.lease`); a backend started on the same home within the grace adopts the store, the
agents and the workers its predecessor left (`start`, `list_workers`) instead of starting new
ones, and `detach` leaves them all running for such a successor.

With ``warm_runtimes: N`` each server keeps N pre-started runtimes that worker starts adopt
(`pool.RuntimePool`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from hydraserve.cluster.base import WorkerSpec, model_weights_gb, worker_args
from hydraserve.cluster.http import HttpApi, HttpServices, HttpWorker
from hydraserve.cluster.pool import RuntimePool
from hydraserve.cluster.record import ClusterRecord, Entry
from hydraserve.lease import RENEW_EVERY_S, Lease, renew_file
from hydraserve.protocol import RuntimeAssignment
from hydraserve.config import ClusterConfig, ServerConfig
from hydraserve.store.agent import SHM_PREFIX
from hydraserve.store.launch import AdoptedProcess, ServerProcess, pid_alive

log = logging.getLogger("hydraserve.cluster")

RUNTIME_CONTEXT_GB = 0.5  # real GB a pooled runtime's CUDA context holds on its GPU


class LocalCluster(HttpServices):
    def __init__(self, cfg: ClusterConfig, log_dir: str | None = None, token: str | None = None,
                 home: str | Path | None = None):
        """``token``: the cluster token. The store, agents and workers started here inherit this
        process's environment, which is where they read it (the same one) from. ``home``: the
        cluster's folder, where a successor finds it (None: a new temporary folder, removed
        at close and by the store of an orphaned cluster)."""
        self.cfg = cfg
        self._owns_home = home is None
        self.home = Path(tempfile.mkdtemp(prefix="hydraserve-cluster-")) if home is None \
            else Path(home)
        self.log_dir = Path(log_dir) if log_dir else self.home / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.root = self.home / "store"
        self.root.mkdir(parents=True, exist_ok=True)
        self.record = ClusterRecord(self.home / "record.json")
        self.lease = Lease(cfg.orphan_grace_s, self.home / "lease")
        self._renewed = 0.0
        self.adopted_services = 0  # the store and agents found running at start
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
        self.runtimes = RuntimePool(cfg, self.log_dir, self.lease.args())

    def start(self) -> None:
        """Adopt the store and agents a predecessor left on this home (alive, started with the
        same arguments), start the rest."""
        self.renew_lease(force=True)
        found = self.record.load()
        scale, lease = self.cfg.scale.size_scale, self.lease.args()
        egress = ["--egress-gbps", str(self.cfg.egress_gbps / scale)] if self.cfg.egress_gbps else []
        cleanup = ["--orphan-cleanup", str(self.home)] if self._owns_home else []
        self._args["store"] = ["store", "serve", "--root", str(self.root), *egress, *lease, *cleanup]
        self._store = self._found(self.record.store if found else None, self._args["store"])
        if self._store is None:
            self._store = ServerProcess(self._args["store"], self.log_dir / "store.log")
            self.record.set_store(Entry(self._store.proc.pid, self._store.url,
                                        self._args["store"]))
        for s in self.cfg.servers:
            self._args[s.name] = ["store", "agent", "--node", s.name, "--remote", self._store.url,
                                  "--nic-gbps", str(s.nic_gbps / scale),
                                  "--cache-gb", str(s.cache_gb / scale), *lease]
            agent = self._found(self.record.agents.get(s.name) if found else None,
                                self._args[s.name])
            self._agents[s.name] = agent or ServerProcess(
                self._args[s.name], self.log_dir / f"agent-{s.name}.log", wait=False)
        for name, a in self._agents.items():
            a.wait_ready()
            self.record.set_agent(name, Entry(a.proc.pid, a.url, self._args[name]))
        self._stop_unknown(found)
        self.runtimes.fill()
        log.info("local cluster %s: store %s, %d agents (of these %d processes, %d were "
                 "adopted from the control plane before), %d warm runtime(s) per server",
                 self.home, self._store.url, len(self._agents), len(self._agents) + 1,
                 self.adopted_services, self.cfg.warm_runtimes)
        self._watcher = threading.Thread(target=self._watch, name="cluster-watch", daemon=True)
        self._watcher.start()

    def _ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live process of this cluster (it holds this home's lease: a
        reused pid, or another cluster's process, does not)."""
        return pid_alive(pid, f"--lease {self.lease.path}")

    def _found(self, entry: Entry | None, args: list[str]) -> ServerProcess | None:
        """The process of a record entry, adopted when it runs with ``args``; one that runs with
        other arguments is stopped (None either way then)."""
        if entry is None or entry.url is None or not self._ours(entry.pid):
            return None
        proc = AdoptedProcess(entry.pid, entry.url, entry.args, self.log_dir / "adopted.log")
        if entry.args != args:
            log.warning("pid %d (hydraserve %s) runs with other arguments than this cluster's: "
                        "stopping it", entry.pid, " ".join(entry.args[:2]))
            proc.stop(timeout=10)
            return None
        self.adopted_services += 1
        return proc

    def _stop_unknown(self, found: bool) -> None:
        """Stop the agents of the record that this cluster has no server for any more."""
        for name, entry in list(self.record.agents.items()) if found else ():
            if name not in self._agents:
                if self._ours(entry.pid):
                    AdoptedProcess(entry.pid, entry.url, entry.args, os.devnull).stop(timeout=10)
                self.record.set_agent(name, None)

    def renew_lease(self, force: bool = False) -> None:
        """Touch the lease file every `RENEW_EVERY_S` (the control plane's tick calls this)."""
        now = time.monotonic()
        if force or now - self._renewed >= RENEW_EVERY_S:
            self._renewed = now
            renew_file(self.lease.path)

    # -- the warm runtime pool (`pool.RuntimePool`) -----------------------------------------
    def warm_pool(self) -> dict[str, dict[str, int]]:
        idle, imported = self.pool(), self.pool(imported=True)
        return {node: {"idle": len(pids), "imported": len(imported[node])}
                for node, pids in idle.items()}

    def gpu_budgets(self) -> dict[str, list[float]]:
        """The servers' GPU budgets less what the warm runtimes hold: on CUDA, each pooled
        runtime's context on the first GPU of its server; on CPU nothing."""
        held = self.cfg.warm_runtimes * RUNTIME_CONTEXT_GB * self.cfg.scale.size_scale \
            if self.cfg.device == "cuda" else 0.0
        return {s.name: [max(0.0, g - held) if i == 0 else g for i, g in enumerate(s.gpus)]
                for s in self.cfg.servers}

    def pool(self, imported: bool = False) -> dict[str, list[int]]:
        """The pids of each server's idle pooled runtimes that are alive (``imported``: and
        whose imports are done)."""
        return self.runtimes.pids(imported)

    @property
    def adopted(self) -> int:
        """Worker starts that adopted a pooled runtime."""
        return self.runtimes.adopted

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
        proc = ServerProcess([*self._args[key], "--port", str(old.port)],
                             self.log_dir / f"{what}.{self._restarts}.log")
        entry = Entry(proc.proc.pid, proc.url, self._args[key])
        self.record.set_store(entry) if key == "store" else self.record.set_agent(key, entry)
        return proc

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

    def model_size_gb(self, name: str) -> float:
        return model_weights_gb(self.root / name, self.cfg.scale.size_scale)

    # -- what the control plane calls on its loop (blocking steps run in an executor) ---------
    async def layout(self, model: str, p: int) -> list[tuple[int, int]]:
        await self._alive(self._store)
        return await super().layout(model, p)

    async def prefetch(self, node: str, model: str, kind: str, p: int, rank: int) -> None:
        await self._alive(self._agents[node])
        await super().prefetch(node, model, kind, p, rank)

    async def start_worker(self, spec: WorkerSpec) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._start_worker, spec)

    def _start_worker(self, spec: WorkerSpec) -> None:
        agent = self.agent_url(spec.node)
        proc = None
        if spec.engine == "hydraserve" and spec.device == self.cfg.device:
            proc = self.runtimes.take(spec.node, RuntimeAssignment(spec, agent))
        if proc is not None:
            log.info("worker %s: adopted the warm runtime pid %d on %s", spec.worker_id,
                     proc.proc.pid, spec.node)
        else:
            proc = ServerProcess([*worker_args(spec, agent), *self.lease.args()],
                                 self.log_dir / f"worker-{spec.worker_id}.log", wait=False)
        with self._lock:
            self._workers[spec.worker_id] = proc
        self.record.set_worker(spec.worker_id, Entry(proc.proc.pid, None, spec=spec.to_json()))

    async def wait_worker(self, worker_id: str, timeout: float = 120.0) -> HttpWorker:
        proc = self._workers[worker_id]
        url = await asyncio.get_running_loop().run_in_executor(
            None, self._wait_ready, proc, timeout)
        entry = self.record.workers.get(worker_id)
        if entry is not None and entry.url != url:
            self.record.set_worker(worker_id, Entry(entry.pid, url, spec=entry.spec))
        return HttpWorker(self._api, url)

    async def list_workers(self) -> dict[str, HttpWorker]:
        """The workers of the record that run and serve their control API; those that run
        without one yet (a predecessor died while they started) are stopped."""
        return await asyncio.get_running_loop().run_in_executor(None, self._list_workers)

    def _list_workers(self) -> dict[str, HttpWorker]:
        out = {}
        for wid, entry in list(self.record.workers.items()):
            with self._lock:
                known = self._workers.get(wid)
            if known is not None:
                if known.proc.poll() is None and known.url:
                    out[wid] = HttpWorker(self._api, known.url)
                continue
            # a worker that was a pooled runtime has a runtime's command line: which worker it
            # is, its health says (the control plane checks the spec it reports)
            alive = self._ours(entry.pid)
            proc = AdoptedProcess(entry.pid, entry.url, [], self.log_dir / "adopted.log")
            if alive and entry.url:
                with self._lock:
                    self._workers[wid] = proc
                out[wid] = HttpWorker(self._api, entry.url)
                continue
            if alive:
                log.warning("worker %s (pid %d) was still starting when its control plane "
                            "went: stopping it", wid, entry.pid)
                proc.stop(timeout=10)
            self.record.set_worker(wid, None)
        return out

    @staticmethod
    def _wait_ready(proc: ServerProcess, timeout: float) -> str:
        reader = getattr(proc, "reader", None)
        if reader is not None:  # an adopted runtime: its ready line first
            reader.join(timeout)
        return proc.wait_ready(timeout)

    def worker_alive(self, worker_id: str) -> bool:
        proc = self._workers.get(worker_id)
        return proc is not None and proc.proc.poll() is None

    def worker_pid(self, worker_id: str) -> int:
        return self._workers[worker_id].proc.pid

    # -- the processes themselves, for callers on this machine (tests, LocalPipeline) ---------
    def worker_process(self, worker_id: str) -> ServerProcess:
        return self._workers[worker_id]

    def agent_process(self, node: str) -> ServerProcess:
        return self._agents[node]

    def store_process(self) -> ServerProcess | None:
        return self._store

    async def stop_worker(self, worker_id: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._stop_worker, worker_id)

    def _stop_worker(self, worker_id: str) -> None:
        with self._lock:
            proc = self._workers.pop(worker_id, None)
        if proc is not None:
            proc.stop(timeout=10)
        self.record.set_worker(worker_id, None)

    async def aclose(self) -> None:
        await self._api.close()

    def _let_go(self) -> None:
        """Stop supervising and refilling; stop the idle pooled runtimes (they read their
        assignment from this process: no successor can adopt them)."""
        self._closing.set()
        self.runtimes.close()
        if self._watcher is not None:
            self._watcher.join(30)

    def detach(self) -> None:
        self._let_go()
        self.renew_lease(force=True)  # the successor's grace starts now
        log.info("local cluster %s left running for the control plane that takes over: "
                 "store, %d agents, %d workers", self.home, len(self._agents),
                 len(self._workers))

    def close(self) -> None:
        self._let_go()
        for wid in list(self._workers):
            self._stop_worker(wid)
        for a in self._agents.values():
            a.stop()
            _free_segments(a.proc.pid)  # nothing left unless it was killed
        if self._store:
            self._store.stop()
        self.record.remove()  # nothing runs: a successor starts a new cluster
        # the store's links and, in a temporary home, the logs: nothing stays behind
        shutil.rmtree(self.home if self._owns_home else self.root, ignore_errors=True)


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
