"""The local backend's warm runtime pool: each server keeps ``warm_runtimes`` pre-started
runtimes (``hydraserve runtime``: torch, the engine and the HTTP stack imported, on CUDA the
context made). A worker start takes one (its spec goes down the runtime's stdin; nothing forks)
and a replacement is started at once, importing at the idle CPU priority so that it never slows
the cold start in progress. A runtime found dead is discarded and replaced; with none left, a
worker starts the ordinary way. An idle runtime reads its assignment from this process: it
leaves when this process goes (its stdin closes), so no successor adopts it."""
from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from pathlib import Path

from hydraserve.config import ClusterConfig
from hydraserve.protocol import RUNTIME_READY, RuntimeAssignment
from hydraserve.store.launch import ServerProcess

log = logging.getLogger("hydraserve.cluster")


class RuntimePool:
    def __init__(self, cfg: ClusterConfig, log_dir: Path, lease_args: list[str]) -> None:
        self.cfg, self.log_dir, self.lease_args = cfg, log_dir, lease_args
        self.lock = threading.Lock()
        self.idle: dict[str, list[ServerProcess]] = {s.name: [] for s in cfg.servers}
        self.adopted = 0  # worker starts that took a pooled runtime
        self._closing = False
        self._ids = itertools.count()

    def fill(self) -> None:
        for s in self.cfg.servers:
            for _ in range(self.cfg.warm_runtimes):
                self.add(s.name)

    def add(self, node: str) -> None:
        with self.lock:
            if self._closing:
                return
            n = next(self._ids)
        proc = ServerProcess(["runtime", "--device", self.cfg.device, "--idle-imports",
                              *self.lease_args],
                             self.log_dir / f"runtime-{node}-{n}.log", wait=False,
                             stdin_pipe=True)
        # the first line it prints says its imports are done; this thread is its only reader
        # until then (a worker's wait_ready reads the lines after it)
        proc.imported = threading.Event()
        proc.reader = threading.Thread(target=self._read_ready, args=(proc,), daemon=True)
        proc.reader.start()
        with self.lock:
            if not self._closing:
                self.idle[node].append(proc)
                return
        proc.stop()

    @staticmethod
    def _read_ready(proc: ServerProcess) -> None:
        try:
            if proc.proc.stdout.readline().startswith(RUNTIME_READY):
                proc.imported.set()
        except (OSError, ValueError):  # closed: it was stopped
            pass

    def take(self, node: str, job: RuntimeAssignment) -> ServerProcess | None:
        """A pooled runtime of ``node`` that took ``job`` (a replacement is on its way), or None
        when none is alive."""
        while True:
            with self.lock:
                if not self.idle.get(node):
                    return None
                proc = self.idle[node].pop(0)
            if proc.proc.poll() is None:
                try:
                    proc.proc.stdin.write(json.dumps(job.to_json()) + "\n")
                    proc.proc.stdin.flush()
                except OSError:  # it died between the check and the write
                    pass
                else:
                    try:  # one still importing at idle priority: finish at the normal one
                        os.sched_setscheduler(proc.proc.pid, os.SCHED_OTHER, os.sched_param(0))
                    except (AttributeError, OSError):
                        pass
                    self.adopted += 1
                    self.refill(node)
                    return proc
            log.warning("node %s: pooled runtime pid %d died while idle (exit %s); replacing it",
                        node, proc.proc.pid, proc.proc.poll())
            proc.stop(timeout=5)
            self.refill(node)

    def refill(self, node: str) -> None:
        threading.Thread(target=self.add, args=(node,), daemon=True,
                         name=f"refill-{node}").start()

    def pids(self, imported: bool = False) -> dict[str, list[int]]:
        """The pids of each server's idle runtimes that are alive (``imported``: and whose
        imports are done)."""
        with self.lock:
            return {node: [p.proc.pid for p in procs if p.proc.poll() is None
                           and (not imported or p.imported.is_set())]
                    for node, procs in self.idle.items()}

    def close(self) -> None:
        """Stop the idle runtimes; none is started from here on."""
        with self.lock:
            self._closing = True
            idle = [p for procs in self.idle.values() for p in procs]
            for procs in self.idle.values():
                procs.clear()
        for p in idle:
            p.stop(timeout=5)
