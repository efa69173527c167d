"""Start-up and life-cycle stamps of a worker (wall-clock seconds, so that the control plane can
put the stamps of several processes on one axis: seconds since the request arrived)."""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("hydraserve.worker")

# the order a cold start normally goes through
EVENTS = ("spawned", "attached", "imports_done", "http_ready", "connected", "weights_ready",
          "engine_ready", "first_token", "consolidation_started", "rest_loaded", "consolidated")


class Timeline:
    def __init__(self, worker_id: str, start: float | None = None):
        self.worker_id = worker_id
        self._stamps: dict[str, float] = {}
        self._lock = threading.Lock()
        if start is not None:
            self._stamps["spawned"] = start

    def mark(self, event: str, once: bool = True) -> None:
        with self._lock:
            if once and event in self._stamps:
                return
            self._stamps[event] = time.time()
        log.info("worker %s: %s", self.worker_id, event)

    def has(self, event: str) -> bool:
        return event in self._stamps

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self._stamps)
