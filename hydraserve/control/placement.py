"""Placement policies: pure functions of a `PlacementRequest` returning a `Placement` or None.

None means nothing can be placed now and the request keeps waiting. `place_ours` is HydraServe's
SLO- and network-aware algorithm (PAPER.md section 4); `place_naive`, `place_static` and
`place_cached` are the baselines and the host-memory-cache shortcut.

Interpretations of PAPER.md section 4 made here (the text leaves them open):
- R is clamped to >= 1: the all-card count a starts at min(p, R) and a = 0 would leave the
  bottleneck bandwidth (the a-th best master-capable rnet) undefined.
- "stop once a solution with p >= R exists": a solution found at some p < R does not end the
  search; the next larger p that meets the SLO replaces it. The last solution found is used.
- "skip p with fewer than p eligible nodes": a node is eligible for p iff its smallest k is
  <= p, i.e. iff rgpu >= size(p) (size is non-increasing in k); nodes whose smallest k exceeds
  P are never eligible.
- The TPOT check applies only when both a profiled TPOT and a TPOT SLO are known.
- Step 1 and step 4 ("p = 1 on the best-bandwidth node") choose among the nodes that can hold
  the whole model and offer bandwidth (rnet > 0), i.e. the master-capable nodes.
- Step 5 fills the all-card slots first, with the a master-capable nodes of highest rnet, then
  the part-card slots with the best remaining nodes fitting size(p). The bandwidth this gives
  is never below the B the search used, so the prediction stays valid.
- Ties in rnet (or free memory) are broken by node order in the request.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hydraserve.control.snapshot import (
    AFTER_FETCH_MS,
    PIPELINE_HOP_MS,
    SMALL_MODEL_GB,
    NodeSnapshot,
    Placement,
    PlacementRequest,
    StagePlacement,
    stage_size_gb,
)


class PolicyName(enum.Enum):
    """The placement policies a scheduler can be configured with."""

    OURS = "ours"
    NAIVE = "naive"
    STATIC = "static"
    CACHED = "cached"


def tpot_rate(p: int, a: int) -> float:
    """TPOT inflation of a p-stage pipeline with a all-card stages: (p - a) + a / p."""
    return (p - a) + a / p


def predict_ttft_ms(size_gb: float, p: int, bandwidth_gbps: float, prefill_ms: float,
                    rate: float, wait_ms: float, after_fetch_ms: float = AFTER_FETCH_MS) -> float:
    """The TTFT model of `ours`: S / p / B * 8 * 1000 + prefill * rate + W + after_fetch_ms."""
    return size_gb / p / bandwidth_gbps * 8 * 1000 + prefill_ms * rate + wait_ms + after_fetch_ms


def best_fit_gpu(node: NodeSnapshot, reserve_gb: float) -> int | None:
    """Index of the GPU with the smallest free memory >= reserve_gb (lowest index on ties)."""
    fitting = [g for g in node.gpus if g.free_gb >= reserve_gb]
    if not fitting:
        return None
    return min(fitting, key=lambda g: (g.free_gb, g.index)).index


def _by_bandwidth(nodes: Sequence[NodeSnapshot]) -> list[NodeSnapshot]:
    # sorted() is stable: equal rnet keeps the request's node order
    return sorted(nodes, key=lambda n: -n.offered_gbps)


def _stage(rank: int, node: NodeSnapshot, reserve_gb: float, all_card: bool) -> StagePlacement:
    gpu = best_fit_gpu(node, reserve_gb)
    if gpu is None:  # callers only pass nodes with rgpu >= reserve_gb
        raise ValueError(f"node {node.name} has no GPU with {reserve_gb} GB free")
    return StagePlacement(rank=rank, node=node.name, gpu=gpu, reserve_gb=reserve_gb,
                          all_card=all_card)


def _single(node: NodeSnapshot, size_gb: float, policy: PolicyName,
            predicted_ttft_ms: float | None = None, from_cache: bool = False) -> Placement:
    stage = _stage(0, node, stage_size_gb(size_gb, 1), all_card=True)
    return Placement(p=1, stages=(stage,), predicted_ttft_ms=predicted_ttft_ms,
                     consolidate=False, from_cache=from_cache, policy=policy.value)


@dataclass(frozen=True)
class _Choice:
    p: int
    a: int
    ttft_ms: float


def _search(req: PlacementRequest, masters: list[NodeSnapshot],
            fitting: dict[int, list[NodeSnapshot]]) -> _Choice | None:
    """Step 3: for each p the fewest all-card a whose predicted TTFT meets the SLO; the search
    ends at the first such p >= R, and a choice at p < R is replaced by any later one."""
    model = req.model
    wanted = max(1, req.instances_wanted)
    profiled = model.profiled_tpot_ms is not None and model.tpot_slo_ms is not None
    choice: _Choice | None = None
    for p in range(1, req.max_p + 1):
        if choice is not None and choice.p >= wanted:
            break
        if len(fitting[p]) < p:
            continue
        for a in range(p if p <= wanted else wanted, p + 1):
            if a > len(masters):
                break
            rate = tpot_rate(p, a)
            if profiled:
                tpot = model.profiled_tpot_ms * rate + PIPELINE_HOP_MS * (p - 1)
                if tpot > model.tpot_slo_ms:
                    continue
            if p == 1:
                bandwidth = masters[0].offered_gbps
            else:
                bandwidth = min(masters[a - 1].offered_gbps, fitting[p][p - 1].offered_gbps)
            ttft = predict_ttft_ms(model.size_gb, p, bandwidth, model.prefill_ms, rate,
                                   req.wait_ms, req.after_fetch_ms)
            if ttft < model.ttft_slo_ms:
                choice = _Choice(p, a, ttft)
                break
    return choice


def place_ours(req: PlacementRequest) -> Placement | None:
    """HydraServe's placement (PAPER.md section 4, steps 1-5; see the module docstring).

    Returns a p-stage placement whose first a stages are all-card (reserve size(1)) and whose
    other stages reserve size(p), each stage on a distinct node; `consolidate` iff p > 1 and
    a < p. Falls back to p = 1 on the master-capable node with the most bandwidth when no
    (p, a) meets the TTFT SLO; None when no node can hold the whole model.
    """
    model = req.model
    size = model.size_gb
    usable = [n for n in req.nodes if n.offered_gbps > 0 and n.rgpu > 0]
    # fitting[p]: nodes eligible for p (rgpu >= size(p)), best bandwidth first
    fitting = {p: _by_bandwidth([n for n in usable if n.rgpu >= stage_size_gb(size, p)])
               for p in range(1, req.max_p + 1)}
    masters = fitting.get(1, [])
    if not masters:
        return None
    slow = (model.profiled_tpot_ms is not None and model.tpot_slo_ms is not None
            and model.profiled_tpot_ms >= model.tpot_slo_ms)
    choice = None if slow else _search(req, masters, fitting)
    if choice is None:
        return _single(masters[0], size, PolicyName.OURS)
    p, a = choice.p, choice.a
    all_card = masters[:a]
    taken = {n.name for n in all_card}
    part_card = [n for n in fitting[p] if n.name not in taken][:p - a]
    stages = [_stage(r, n, stage_size_gb(size, 1), True) for r, n in enumerate(all_card)]
    stages += [_stage(a + r, n, stage_size_gb(size, p), False) for r, n in enumerate(part_card)]
    return Placement(p=p, stages=tuple(stages), predicted_ttft_ms=choice.ttft_ms,
                     consolidate=p > 1 and a < p, policy=PolicyName.OURS.value)


def place_naive(req: PlacementRequest) -> Placement | None:
    """Serverless vLLM: p = 1 on the first node (request order) with rgpu >= ceil(S + 5).

    The network is ignored: a node offering 0 bandwidth is still used.
    """
    need = stage_size_gb(req.model.size_gb, 1)
    for node in req.nodes:
        if node.rgpu >= need:
            return _single(node, req.model.size_gb, PolicyName.NAIVE)
    return None


def place_static(req: PlacementRequest, p: int | None = None) -> Placement | None:
    """A fixed pipeline size p (default: the request's max_p) on the p best-bandwidth nodes.

    p is forced to 1 for models of at most SMALL_MODEL_GB. Every stage reserves size(p); only
    nodes offering bandwidth (rnet > 0) and fitting size(p) are used; no consolidation, and no
    stage is all-card unless p = 1. None when fewer than p nodes qualify.
    """
    p = req.max_p if p is None else p
    if p < 1:
        raise ValueError(f"pipeline size must be >= 1, got {p}")
    size = req.model.size_gb
    if size <= SMALL_MODEL_GB:
        p = 1
    need = stage_size_gb(size, p)
    chosen = _by_bandwidth([n for n in req.nodes if n.offered_gbps > 0 and n.rgpu >= need])[:p]
    if len(chosen) < p:
        return None
    if p == 1:
        return _single(chosen[0], size, PolicyName.STATIC)
    stages = tuple(_stage(r, n, need, all_card=False) for r, n in enumerate(chosen))
    return Placement(p=p, stages=stages, predicted_ttft_ms=None, consolidate=False,
                     policy=PolicyName.STATIC.value)


def place_cached(req: PlacementRequest) -> Placement | None:
    """p = 1 on a node whose host-memory cache holds the model, with no network fetch.

    Among the nodes holding the model with rgpu >= size(1), the one with the most free GPU
    memory wins (request order on ties). None when no such node exists.
    """
    need = stage_size_gb(req.model.size_gb, 1)
    holders = [n for n in req.nodes if req.model.name in n.cached_models and n.rgpu >= need]
    if not holders:
        return None
    best = max(holders, key=lambda n: n.rgpu)  # max() keeps the first of equal keys
    return _single(best, req.model.size_gb, PolicyName.CACHED, from_cache=True)


Policy = Callable[[PlacementRequest], Placement | None]

# `static` through the registry uses the request's max_p as its fixed p
POLICIES: dict[PolicyName, Policy] = {
    PolicyName.OURS: place_ours,
    PolicyName.NAIVE: place_naive,
    PolicyName.STATIC: place_static,
    PolicyName.CACHED: place_cached,
}
