"""The local backend's cluster record: what runs, so that the next control plane finds it.

A small JSON file in the cluster's folder, rewritten atomically (a temporary file, then
``os.replace``) on every change, never read back while the control plane that writes it lives:

    {"store":   {"pid": 1, "url": "http://...", "args": [...]},
     "agents":  {"NODE": {"pid": ..., "url": ..., "args": [...]}},
     "workers": {"WORKER_ID": {"pid": ..., "url": ... or null, "spec": a WorkerSpec}}}

``args`` is the command line a process was started with: one started with other arguments
(another cluster file) is not adopted.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("hydraserve.cluster")


@dataclass
class Entry:
    pid: int
    url: str | None
    args: list[str] = field(default_factory=list)
    spec: dict | None = None  # a worker's WorkerSpec, as JSON

    def to_json(self) -> dict:
        out = {"pid": self.pid, "url": self.url, "args": self.args}
        if self.spec is not None:
            out["spec"] = self.spec
        return out

    @classmethod
    def from_json(cls, d: dict) -> Entry:
        return cls(int(d["pid"]), d.get("url"), list(d.get("args") or ()), d.get("spec"))


class ClusterRecord:
    """The record at ``path``; every method may be called from any thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.store: Entry | None = None
        self.agents: dict[str, Entry] = {}
        self.workers: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def load(self) -> bool:
        """Read what a predecessor left; False when there is nothing (or nothing readable)."""
        try:
            d = json.loads(self.path.read_text())
            store = Entry.from_json(d["store"]) if d.get("store") else None
            agents = {n: Entry.from_json(e) for n, e in (d.get("agents") or {}).items()}
            workers = {w: Entry.from_json(e) for w, e in (d.get("workers") or {}).items()}
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("the cluster record %s is unreadable (%s): starting a new cluster",
                        self.path, e)
            return False
        with self._lock:
            self.store, self.agents, self.workers = store, agents, workers
        return True

    def set_store(self, entry: Entry | None) -> None:
        with self._lock:
            self.store = entry
        self.save()

    def set_agent(self, node: str, entry: Entry | None) -> None:
        self._set(self.agents, node, entry)

    def set_worker(self, worker_id: str, entry: Entry | None) -> None:
        self._set(self.workers, worker_id, entry)

    def _set(self, table: dict[str, Entry], key: str, entry: Entry | None) -> None:
        """``table[key] = entry`` (None: dropped), then the record is saved."""
        with self._lock:
            if entry is None:
                table.pop(key, None)
            else:
                table[key] = entry
        self.save()

    def save(self) -> None:
        with self._lock:
            body = {"store": self.store.to_json() if self.store else None,
                    "agents": {n: e.to_json() for n, e in self.agents.items()},
                    "workers": {w: e.to_json() for w, e in self.workers.items()}}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(body, indent=1))
            os.replace(tmp, self.path)

    def remove(self) -> None:
        """Nothing runs any more: the next control plane starts a new cluster."""
        with self._lock:
            self.store, self.agents, self.workers = None, {}, {}
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
