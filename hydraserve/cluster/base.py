"""The cluster backend protocol: the control plane starts and stops workers only through it."""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from hydraserve.config import ServerConfig
from hydraserve.protocol import (ErrorEvent, GenerateRequest, Peer, TokenEvent, WorkerHealth,
                                 WorkerSpec, worker_args)  # noqa: F401 - the last two re-exported


class WorkerError(RuntimeError):
    """A worker refused or failed a call; ``status`` is its HTTP-like status (400: the request
    itself is invalid and the worker is fine; anything else: the worker is broken)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class WorkerClient(Protocol):
    """One started worker's control API, the only way the control plane reaches a worker; it
    speaks the messages of `hydraserve.protocol`.

    ``generate`` yields `TokenEvent` items, or one `ErrorEvent` when generation fails
    mid-stream, and raises `WorkerError` when the worker refuses the request; ``wait_for``
    returns once an event is on the worker's timeline, the worker ended, or the timeout
    passed (a long-poll: the control plane learns of it when it happens)."""

    host: str  # where its stage port listens (peers connect there)
    url: str | None  # its control API (None where it has none, as in the simulator)

    async def health(self) -> WorkerHealth: ...

    async def wait_for(self, event: str, timeout: float) -> WorkerHealth: ...

    async def init(self, peers: list[Peer]) -> None: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent | ErrorEvent]: ...

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

    def close(self) -> None:
        """Stop everything this backend started (workers, and locally the store and agents)."""

    def detach(self) -> None:
        """Let go of the cluster without stopping what runs, for the control plane that takes
        over (a standby, a restart within the orphan grace): it adopts it all."""

    def nodes(self) -> tuple[ServerConfig, ...]: ...

    def agent_urls(self) -> dict[str, str]:
        """Each node's storage agent API, for operators ({} where there is none)."""

    def register_model(self, name: str, path: str) -> None: ...

    def unregister_model(self, name: str) -> None: ...

    def model_size_gb(self, name: str) -> float:
        """The registered model's weights, in the cluster's GB (see `ScaleConfig`): what a
        worker holding the whole model claims."""

    def gpu_budgets(self) -> dict[str, list[float]]:
        """Each node's GPU memory, per GPU in the cluster's GB, that the control plane may
        claim: the configured budgets less what the backend itself holds there."""

    def warm_pool(self) -> dict[str, dict[str, int]]:
        """Each node's idle pre-started runtimes, ``{"idle": n, "imported": m}`` (those whose
        imports are done), for operators; {} for a backend without a pool."""

    async def layout(self, model: str, p: int) -> list[tuple[int, int]]:
        """The decoder layers [start, end) of each of the p stages of ``model``."""

    async def prefetch(self, node: str, model: str, kind: str, p: int, rank: int) -> None:
        """Order ``node``'s storage agent to pull an image (kind "stage", "full") now."""

    async def cached_models(self, node: str) -> set[str]:
        """Models whose whole image ``node`` holds in host memory."""

    async def fetch_stats(self, node: str, model: str, kind: str, p: int,
                          rank: int) -> dict | None:
        """The latest fetch of that image onto ``node``: {"length", "received" (bytes),
        "seconds" (so far, or until it ended), "done"}; None if there is none."""

    async def warm_cache(self, model: str) -> None:
        """Put ``model`` whole in every node's host cache and wait until it is there."""

    async def start_worker(self, spec: WorkerSpec) -> None:
        """Begin starting the worker; returns without waiting for it."""

    async def wait_worker(self, worker_id: str, timeout: float) -> WorkerClient:
        """Wait until the worker serves its control API; return its client."""

    async def stop_worker(self, worker_id: str) -> None: ...

    def worker_alive(self, worker_id: str) -> bool: ...

    async def list_workers(self) -> dict[str, WorkerClient]:
        """The workers that run in the cluster now, whoever started them (this control plane or
        one before it: the cluster is the record): a client by worker id. A control plane that starts
        reads each one's health (its `WorkerSpec` and phase) and adopts it or stops it; after
        this call `stop_worker` and `worker_alive` know every worker listed."""

    def renew_lease(self) -> None:
        """The control plane lives: renew the lease of every process this backend started for
        it (`hydraserve.lease`). Called on every tick; the backend acts only as often as its
        leases need (locally every `lease.RENEW_EVERY_S`, a Kubernetes pod every quarter of its
        grace) and must return at once."""

    async def aclose(self) -> None: ...


def model_weights_gb(path: str | Path, size_scale: float) -> float:
    """The safetensors weights in the model folder ``path``, in the cluster's GB."""
    nbytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return nbytes * size_scale / 1e9
