"""In-memory leases renewed over HTTP, from the control plane's event loop.

A process the control plane reaches over the network (a Kubernetes worker pod) holds an
in-memory lease (`hydraserve.lease`): it exits by itself once nobody called its ``POST /lease``
for its orphan grace. `HttpLeases.renew` is what a backend's ``renew_lease`` calls on every tick:
it returns at once, and at most every ``every_s`` seconds it starts one task on the running
loop that posts to every target concurrently, each call bounded by ``timeout_s``. The renewals
run on the control plane's own loop on purpose: a control plane whose loop is stuck renews
nothing, and its processes lapse as orphans should.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from hydraserve.cluster.base import WorkerError
from hydraserve.cluster.http import HttpApi

log = logging.getLogger("hydraserve.cluster")


class HttpLeases:
    """Renews the leases of the processes whose control APIs ``targets()`` names (base URLs)."""

    def __init__(self, api: HttpApi, every_s: float, timeout_s: float | None = None) -> None:
        if every_s <= 0:
            raise ValueError(f"a renewal interval must be positive, got {every_s}")
        self.api, self.every_s = api, every_s
        self.timeout_s = timeout_s if timeout_s is not None else max(1.0, min(every_s, 10.0))
        self._last = float("-inf")  # monotonic time of the last round started
        self._task: asyncio.Task | None = None
        self.rounds = 0  # renewal rounds started (operators and tests read it)

    def renew(self, targets: Callable[[], list[str]]) -> None:
        """Start a round of renewals if one is due and none is in flight; never blocks. Must be
        called on the running loop (the renewals run there)."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return  # the last round still runs (a slow or unreachable process)
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        urls = targets()
        if urls:
            self.rounds += 1
            self._task = loop.create_task(self._round(urls))

    async def _round(self, urls: list[str]) -> None:
        await asyncio.gather(*(self._one(u) for u in urls))

    async def _one(self, url: str) -> None:
        try:
            await asyncio.wait_for(self.api.post(url + "/lease"), self.timeout_s)
        except (WorkerError, asyncio.TimeoutError) as e:
            # a process that went away meanwhile, or one the watch has not yet shown gone
            log.debug("renewing the lease of %s failed: %s", url, e)

    async def aclose(self) -> None:
        """Cancel a round in flight (call it on the loop the renewals run on)."""
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
