"""An emulated network link: a byte rate really enforced, shared fairly by its users.

Every sender asks for a grant before moving a chunk; grants are handed out on a virtual clock in
request order, so n busy senders interleave their chunks and get 1/n of the rate each. Sleeps
that overshoot are absorbed because the clock advances by exact amounts.
"""
from __future__ import annotations

import asyncio

GBPS = 1e9 / 8  # bytes per second in one Gbps


class Link:
    def __init__(self, gbps: float | None):
        """``gbps`` None or <= 0: unlimited."""
        self.bytes_per_s = gbps * GBPS if gbps and gbps > 0 else None
        self._next = 0.0
        self.bytes_total = 0

    @property
    def gbps(self) -> float | None:
        return None if self.bytes_per_s is None else self.bytes_per_s / GBPS

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` more bytes may cross the link."""
        self.bytes_total += n
        if self.bytes_per_s is None:
            return
        now = asyncio.get_running_loop().time()
        start = max(self._next, now)
        self._next = start + n / self.bytes_per_s
        if start > now:
            await asyncio.sleep(start - now)
