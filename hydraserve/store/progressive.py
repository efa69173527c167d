"""The reader's side of a progressive region: attach to an agent's shared memory and wait for
bytes. Standard library only, so a worker can attach and start loading before it imports
anything heavy."""
from __future__ import annotations

import os
import struct
import time
from multiprocessing import resource_tracker, shared_memory

from hydraserve.httpjson import CallError, call
from hydraserve.store.image import ImageSpec

COUNTER = 8


class RegionError(RuntimeError):
    """The agent could not provide the region, or its fetch failed or stalled."""


def agent_call(agent_url: str, method: str, path: str, body: dict | None = None,
               timeout: float = 30.0, token: str | None = None) -> dict:
    """One JSON request to a storage agent (``token``: the cluster token); errors become
    :class:`RegionError`."""
    try:
        return call(agent_url, method, path, body, timeout, token)
    except CallError as e:
        raise RegionError(f"agent {e}") from None


class ProgressiveRegion:
    """A shared-memory region ``[u64 received][image]`` being filled by a storage agent."""

    def __init__(self, shm_name: str, offset: int, length: int, region_id: str | None = None,
                 agent_url: str | None = None, token: str | None = None):
        self.shm = shared_memory.SharedMemory(name=shm_name)
        # Python < 3.13 registers attached segments with this process's resource tracker, which
        # would unlink the agent's segment when we exit; the agent owns it.
        try:
            resource_tracker.unregister(self.shm._name, "shared_memory")  # noqa: SLF001
        except Exception:  # noqa: BLE001 - tracker absent or already unregistered
            pass
        self.offset, self.length = offset, length
        self.region_id, self.agent_url = region_id, agent_url
        self.token = token  # the cluster token of the agent's API, for the calls after attach
        self.data = self.shm.buf[offset + COUNTER:offset + COUNTER + length]
        self.cancelled = False  # set by another thread: the reader stops at its next wait

    def cancel(self) -> None:
        """Make the reading thread's next `wait_for` raise; that thread then closes the region
        (closing it from here would pull the mapping from under a read in progress)."""
        self.cancelled = True

    @classmethod
    def attach(cls, agent_url: str, spec: ImageSpec,
               token: str | None = None) -> "ProgressiveRegion":
        """Order (or join) the fetch of ``spec`` on the agent and attach as a reader
        (``token``: the cluster token, sent with this call and the region's later ones)."""
        d = agent_call(agent_url, "POST", "/attach", {**spec.to_dict(), "pid": os.getpid()},
                       token=token)
        return cls(d["shm"], d["offset"], d["length"], d["id"], agent_url, token)

    def received(self) -> int:
        return struct.unpack_from("<Q", self.shm.buf, self.offset)[0]

    def wait_for(self, n: int, timeout: float = 120.0) -> None:
        """Block until the first ``n`` image bytes are in; raise if the fetch fails or stalls."""
        if self.cancelled:
            raise RegionError("the read was cancelled (the worker is stopping)")
        if self.received() >= n:
            return
        deadline = last_check = time.monotonic()
        deadline += timeout
        last = self.received()
        delay = 0.0002
        while True:
            got = self.received()
            if got >= n:
                return
            if self.cancelled:
                raise RegionError("the read was cancelled (the worker is stopping)")
            now = time.monotonic()
            if got != last:
                last, deadline = got, now + timeout
            elif now > deadline:
                raise RegionError(f"no progress for {timeout:.0f} s at byte {got} of {self.length}")
            if self.agent_url and self.region_id and now - last_check > 1.0:
                last_check = now
                state = agent_call(self.agent_url, "GET", f"/regions/{self.region_id}",
                                   token=self.token)
                if state["state"] == "failed":
                    raise RegionError(f"fetch failed: {state['error']}")
            time.sleep(delay)
            delay = min(delay * 2, 0.002)

    def close(self, release: bool = True) -> None:
        """Drop our views; tell the agent we are done (it frees the region if nobody else reads)."""
        try:
            self.data.release()
            self.shm.close()
        except BufferError:
            pass  # a tensor view is still alive; the mapping goes with the process
        if release and self.agent_url and self.region_id:
            try:
                agent_call(self.agent_url, "POST", "/release",
                           {"id": self.region_id, "pid": os.getpid()}, token=self.token)
            except RegionError:
                pass  # the agent is gone; its exit freed the segment
