"""Start-up and life-cycle stamps of a worker (wall-clock seconds, so that the control plane can
put the stamps of several processes on one axis: seconds since the request arrived).

Stamps are set from the worker's threads; the control API waits on them (a long-poll of
``/health?wait=EVENT``) on its event loop, woken by each stamp or by `notify` (a change that is
not a stamp, such as a failure), so a reader learns of an event when it happens."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from hydraserve.protocol import EVENTS  # noqa: F401 - the order a cold start goes through

log = logging.getLogger("hydraserve.worker")


class Timeline:
    def __init__(self, worker_id: str, start: float | None = None):
        self.worker_id = worker_id
        self._stamps: dict[str, float] = {}
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        if start is not None:
            self._stamps["spawned"] = start

    def mark(self, event: str, once: bool = True) -> None:
        with self._lock:
            if once and event in self._stamps:
                return
            self._stamps[event] = time.time()
        log.info("worker %s: %s", self.worker_id, event)
        self.notify()

    def has(self, event: str) -> bool:
        return event in self._stamps

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self._stamps)

    def notify(self) -> None:
        """Wake every waiter to look again (thread-safe)."""
        with self._lock:
            waiters = list(self._waiters)
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that loop is closed: its waiter is gone
                pass

    async def wait(self, event: str, timeout: float,
                   done: Callable[[], bool] = lambda: False) -> bool:
        """Wait on the running loop until ``event`` is stamped or ``done()`` holds, at most
        ``timeout`` seconds; whether it ended so."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        woken = asyncio.Event()
        waiter = (loop, woken)
        with self._lock:
            self._waiters.append(waiter)
        try:
            while True:
                woken.clear()  # before the check: a stamp set after it still wakes us
                if self.has(event) or done():
                    return True
                left = deadline - loop.time()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(woken.wait(), left)
                except asyncio.TimeoutError:
                    pass
        finally:
            with self._lock:
                self._waiters.remove(waiter)
