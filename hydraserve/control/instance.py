"""Requests and instances as the control plane tracks them."""
from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hydraserve.control.gpu import Claim
from hydraserve.control.network import Fetch
from hydraserve.control.snapshot import Placement

if TYPE_CHECKING:
    from hydraserve.cluster.base import WorkerClient


class InstanceState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class Request:
    """One generation request. ``events`` receives {"token_id", "finish_reason"} dicts, or
    one {"error", "status"}; the gateway reads them. A request whose instance is lost goes back
    to the queue with the tokens it produced (``output_ids``) and continues on another
    instance after them, so its stream stays whole."""

    id: str
    model: str
    prompt_ids: list[int]
    params: dict  # the worker's /generate fields besides prompt_ids and output_ids
    arrival: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    instance: str | None = None
    task: asyncio.Task | None = None
    first_token: float | None = None
    output_ids: list[int] = field(default_factory=list)  # sent to the client so far
    retries: int = 0  # times it went back to the queue after its instance failed
    queued_at: float | None = None  # when it last joined its queue (the queue timeout's start)
    cold_start: str | None = None  # the instance started for it (None: none was, yet)
    # set once it has an instance: one started for it (cold_start) or one it went to
    placed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if self.queued_at is None:
            self.queued_at = self.arrival

    @property
    def tokens(self) -> int:
        return len(self.output_ids)


@dataclass
class Stage:
    rank: int
    node: str
    all_card: bool
    claim: Claim
    worker_id: str
    layers: tuple[int, int] = (0, 0)
    client: WorkerClient | None = None  # once the worker serves
    fetch: Fetch | None = None


@dataclass
class Instance:
    id: str
    model: str
    placement: Placement
    stages: list[Stage]
    capacity: int
    state: InstanceState = InstanceState.STARTING
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0
    consolidated: bool = False
    consolidating: bool = False  # from consolidation_started until it ended either way
    timeline: dict[str, float] = field(default_factory=dict)  # seconds since created
    error: str | None = None
    clock: Callable[[], float] = time.monotonic  # the control plane's (created is on it)

    @property
    def head(self) -> Stage:
        return self.stages[0]

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - self.active) if self.state is InstanceState.READY else 0

    def mark(self, event: str) -> None:
        self.timeline.setdefault(event, round(self.clock() - self.created, 4))

    def describe(self) -> dict:
        return {"id": self.id, "model": self.model, "state": self.state.value,
                "p": len(self.stages), "placement_p": self.placement.p,
                "capacity": self.capacity, "active": self.active,
                "consolidated": self.consolidated, "policy": self.placement.policy,
                "predicted_ttft_ms": self.placement.predicted_ttft_ms,
                "from_cache": self.placement.from_cache, "error": self.error,
                "stages": [{"rank": s.rank, "node": s.node, "gpu": s.claim.gpu,
                            "reserved_gb": s.claim.gb, "all_card": s.all_card,
                            "layers": list(s.layers), "worker": s.worker_id,
                            "url": s.client.url if s.client is not None else None}
                           for s in self.stages],
                "timeline": self.timeline}
