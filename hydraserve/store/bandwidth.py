"""An emulated network link: a byte rate really enforced, shared fairly by its users.

Every sender reserves a grant before moving bytes; grants are handed out on a virtual clock in
request order, so n busy senders interleave their grants and get 1/n of the rate each. A grant's
bytes may move once its slot on the link has ended (they have then crossed it), so no transfer
beats the rate, not even by its first grant. Sleeps that overshoot are absorbed because the
clock advances by exact amounts.

Grants are large (:meth:`Link.grant`: about 20 ms of the rate), so pacing costs one call per
grant rather than per network read. Reservations are thread-safe: the storage agent receives in
worker threads (blocking ``recv_into`` straight into shared memory) while the store's sender
paces on its event loop; both clocks are ``time.monotonic``, the clock asyncio uses.
"""
from __future__ import annotations

import asyncio
import threading
import time

GBPS = 1e9 / 8  # bytes per second in one Gbps
GRANT_S = 0.02  # a paced grant is this much of the link's time ...
MIN_GRANT = 256 * 1024  # ... but at least this many bytes
MAX_GRANT = 16 * 2**20  # and at most this many (also the grant of an unlimited link)


class Link:
    def __init__(self, gbps: float | None):
        """``gbps`` None or <= 0: unlimited."""
        self.bytes_per_s = gbps * GBPS if gbps and gbps > 0 else None
        self._next = 0.0
        self._lock = threading.Lock()
        self.bytes_total = 0

    @property
    def gbps(self) -> float | None:
        return None if self.bytes_per_s is None else self.bytes_per_s / GBPS

    def grant(self) -> int:
        """How many bytes one reservation should cover on this link."""
        if self.bytes_per_s is None:
            return MAX_GRANT
        return int(min(MAX_GRANT, max(MIN_GRANT, self.bytes_per_s * GRANT_S)))

    def reserve(self, n: int) -> float:
        """Book ``n`` bytes on the link; returns how many seconds the caller must wait before
        moving them: until the end of their slot, the time they take to cross the link after
        every byte booked before them (0 when the link is unlimited)."""
        with self._lock:
            self.bytes_total += n
            if self.bytes_per_s is None:
                return 0.0
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + n / self.bytes_per_s
            return self._next - now

    async def acquire(self, n: int) -> None:
        """Wait (on the event loop) until ``n`` more bytes may cross the link."""
        wait = self.reserve(n)
        if wait > 0:
            await asyncio.sleep(wait)

    def acquire_blocking(self, n: int) -> None:
        """Wait (in a thread) until ``n`` more bytes may cross the link."""
        wait = self.reserve(n)
        if wait > 0:
            time.sleep(wait)
