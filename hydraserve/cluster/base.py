"""The cluster backend protocol: the control plane starts and stops workers only through it."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from hydraserve.config import ServerConfig
from hydraserve.protocol import WorkerSpec, worker_args  # noqa: F401 - re-exported


class WorkerError(RuntimeError):
    """A worker refused or failed a call; ``status`` is its HTTP-like status (400: the request
    itself is invalid and the worker is fine; anything else: the worker is broken)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class WorkerClient(Protocol):
    """One started worker's control API, the only way the control plane reaches a worker.

    ``health`` answers ``{"stage_port", "timeline": {event: s}, "standalone", "state",
    "error"}``; ``generate`` yields ``{"token_id", "finish_reason"}`` items, or one
    ``{"error"}`` item when generation fails mid-stream, and raises `WorkerError` when the
    worker refuses the request."""

    host: str  # where its stage port listens (peers connect there)
    url: str | None  # its control API (None where it has none, as in the simulator)

    async def health(self) -> dict: ...

    async def init(self, peers: list[dict]) -> None: ...

    def generate(self, body: dict) -> AsyncIterator[dict]: ...

    async def consolidate(self) -> None: ...

    async def stop(self) -> None: ...


class ClusterBackend(Protocol):
    """Where workers run: everything the control plane and the gateway call on a cluster.

    ``start`` and ``close`` may block (processes, API calls): async callers run them in an
    executor. The async methods run on the control plane's event loop (in the simulator a
    virtual-time loop: they must neither block nor start threads); ``aclose`` releases what
    they hold, before ``close``."""

    def start(self) -> None:
        """Bring up the cluster's shared services (store, agents); workers come later."""

    def close(self) -> None: ...

    def nodes(self) -> tuple[ServerConfig, ...]: ...

    def agent_urls(self) -> dict[str, str]:
        """Each node's storage agent API, for operators ({} where there is none)."""

    def register_model(self, name: str, path: str) -> None: ...

    def unregister_model(self, name: str) -> None: ...

    async def layout(self, model: str, p: int) -> list[tuple[int, int]]:
        """The decoder layers [start, end) of each of the p stages of ``model``."""

    async def prefetch(self, node: str, model: str, kind: str, p: int, rank: int) -> None:
        """Order ``node``'s storage agent to pull an image (kind "stage", "full") now."""

    async def cached_models(self, node: str) -> set[str]:
        """Models whose whole image ``node`` holds in host memory."""

    async def warm_cache(self, model: str) -> None:
        """Put ``model`` whole in every node's host cache and wait until it is there."""

    async def start_worker(self, spec: WorkerSpec) -> None:
        """Begin starting the worker; returns without waiting for it."""

    async def wait_worker(self, worker_id: str, timeout: float) -> WorkerClient:
        """Wait until the worker serves its control API; return its client."""

    async def stop_worker(self, worker_id: str) -> None: ...

    def worker_alive(self, worker_id: str) -> bool: ...

    async def aclose(self) -> None: ...
