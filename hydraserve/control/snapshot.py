"""What a placement policy sees: an immutable snapshot of the cluster and of one model.

Units: sizes in GB (GPU memory, model weights), bandwidth in Gbps, times in ms unless a name
says otherwise. The constants are those of the HydraServe artifact (PAPER.md section 3); every
other module of ``hydraserve.control`` takes them from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

KV_RESERVE_GB = 5  # KV cache + activations reserved per full-model placement
ABSORB_LEFTOVER_GB = 6  # a claim leaving <= this much on its GPU takes the rest too
AFTER_FETCH_MS = 2000  # "everything after the fetch" term of the TTFT model
NET_SLACK = 0.9  # a multi-node claim books S * 8 / p / NET_SLACK gigabits per stage
MAX_P = 4  # largest pipeline
SMALL_MODEL_GB = 10  # `static` forces p = 1 for models of at most this size
BATCH_CAPACITY = 8  # requests per instance (8p for a p-stage pipeline)
KEEP_ALIVE_S = 30  # an idle instance is deleted after this long
MAX_GROUP = 4  # instances created per cold-start group
PIPELINE_HOP_MS = 1.0  # TPOT added per extra pipeline stage


def stage_size_gb(size_gb: float, k: int) -> float:
    """GPU memory one stage of a k-stage pipeline reserves: ceil((S + KV_RESERVE_GB) / k)."""
    if k < 1:
        raise ValueError(f"pipeline size must be >= 1, got {k}")
    return float(math.ceil((size_gb + KV_RESERVE_GB) / k))


@dataclass(frozen=True)
class GPU:
    """One GPU of a node: its memory in total and what is still free for new claims."""

    index: int
    total_gb: float
    free_gb: float


@dataclass(frozen=True)
class NodeSnapshot:
    """One GPU server as a policy sees it.

    ``nic_gbps`` is the NIC's bandwidth; ``offered_gbps`` ("rnet") is the share the NIC admission
    offers a new fetch right now (0: starting a fetch here would make an ongoing fetch miss its
    deadline, so network-aware policies skip the node). ``cached_models`` are the models whose
    whole-model image the node's storage agent holds in host memory.
    """

    name: str
    gpus: tuple[GPU, ...]
    nic_gbps: float
    offered_gbps: float
    cached_models: frozenset[str] = frozenset()

    @property
    def rgpu(self) -> float:
        """The largest free memory over the node's GPUs (0 when it has none)."""
        return max((g.free_gb for g in self.gpus), default=0.0)


@dataclass(frozen=True)
class ModelInfo:
    """A model endpoint: weight size, SLOs, and what profiling has measured so far.

    ``profiled_tpot_ms`` is the TPOT measured at p = 1 (None until profiled); ``prefill_ms`` the
    prefill time used by the TTFT model.
    """

    name: str
    size_gb: float
    ttft_slo_ms: float
    tpot_slo_ms: float | None = None
    profiled_tpot_ms: float | None = None
    prefill_ms: float = 0.0


@dataclass(frozen=True)
class PlacementRequest:
    """Everything a policy decides on.

    ``instances_wanted`` is R (instances the scheduler wants now), ``wait_ms`` is W (waiting time
    of the oldest queued request) and ``max_p`` is P. Node order matters: it breaks ties and is
    the scan order of `naive`.
    """

    model: ModelInfo
    nodes: tuple[NodeSnapshot, ...]
    instances_wanted: int = 1
    wait_ms: float = 0.0
    max_p: int = MAX_P
    after_fetch_ms: float = AFTER_FETCH_MS  # a cluster may measure its own


@dataclass(frozen=True)
class StagePlacement:
    """One pipeline stage: the node and GPU it runs on and the memory it reserves.

    ``all_card`` means the stage reserved memory for the whole model (size(1)), so it can later
    consolidate into a standalone instance; the single stage of a p = 1 instance is all-card.
    """

    rank: int
    node: str
    gpu: int
    reserve_gb: float
    all_card: bool


@dataclass(frozen=True)
class Placement:
    """A policy's decision for one new instance.

    ``stages`` are ordered by rank. ``predicted_ttft_ms`` is the TTFT the policy predicted for an
    SLO-meeting choice, None when it made no such prediction (baselines, fallbacks).
    ``consolidate``: the pipeline turns into standalone all-card instances once it serves.
    ``from_cache``: the weights come from the node's host-memory cache, no network fetch.
    """

    p: int
    stages: tuple[StagePlacement, ...]
    predicted_ttft_ms: float | None
    consolidate: bool
    from_cache: bool = False
    policy: str = ""
