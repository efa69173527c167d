"""GPU-memory accounting for a cluster: who holds how much of which GPU.

The ledger is the single owner of the cluster's GPU-memory state; policies see it through
`snapshot_gpus`. Sizes are in GB.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hydraserve.control.snapshot import ABSORB_LEFTOVER_GB, GPU


@dataclass(frozen=True)
class Claim:
    """GPU memory held by one stage: ``gb`` may exceed what was asked (absorbed leftover)."""

    id: int
    node: str
    gpu: int
    gb: float


class GpuLedger:
    """GPU-memory ledger built from ``{node: [total GB of each GPU]}``.

    ``share=True`` (HydraServe, Serverless vLLM) shares GPUs by memory. ``share=False``
    (ServerlessLLM) makes GPUs exclusive: a GPU holding any claim counts as 0 GB free.
    """

    def __init__(self, totals: Mapping[str, Sequence[float]], share: bool = True):
        self._totals = {node: tuple(float(gb) for gb in gpus) for node, gpus in totals.items()}
        self._used = {node: [0.0] * len(gpus) for node, gpus in self._totals.items()}
        self._holders = {node: [0] * len(gpus) for node, gpus in self._totals.items()}
        self._claims: dict[int, Claim] = {}
        self._ids = itertools.count(1)
        self.share = share
        # snapshot_gpus per node (and the sharing it was taken under), until a claim or release
        self._snapshots: dict[str, tuple[bool, tuple[GPU, ...]]] = {}

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node names, in the order the ledger was built with."""
        return tuple(self._totals)

    def free_gb(self, node: str, gpu: int) -> float:
        """Memory a new claim could take on one GPU (0 for a held GPU in exclusive mode)."""
        if not self.share and self._holders[self._node(node)][gpu] > 0:
            return 0.0
        return self._totals[node][gpu] - self._used[node][gpu]

    def snapshot_gpus(self, node: str) -> tuple[GPU, ...]:
        """The node's GPUs with their current free memory, for a `NodeSnapshot` (the same
        tuple until the node's memory changes)."""
        taken = self._snapshots.get(node)
        if taken is not None and taken[0] == self.share:
            return taken[1]
        totals = self._totals[self._node(node)]
        gpus = tuple(GPU(index=i, total_gb=total, free_gb=self.free_gb(node, i))
                     for i, total in enumerate(totals))
        self._snapshots[node] = (self.share, gpus)
        return gpus

    def claim(self, node: str, gpu: int | None, gb: float) -> Claim:
        """Reserve ``gb`` on a GPU of ``node`` (``gpu=None``: best fit, the GPU with the
        smallest free memory >= gb, lowest index on ties).

        When what would be left on that GPU is <= ABSORB_LEFTOVER_GB, the claim takes it too
        (PAPER.md section 3), so ``Claim.gb`` can exceed ``gb``. Raises ValueError when the
        node, the GPU or the free memory does not allow the claim.
        """
        self._node(node)
        if gb <= 0:
            raise ValueError(f"a claim needs a positive size, got {gb} GB")
        if gpu is None:
            fitting = [i for i in range(len(self._totals[node])) if self.free_gb(node, i) >= gb]
            if not fitting:
                raise ValueError(f"no GPU of node {node} has {gb} GB free "
                                 f"(free: {[g.free_gb for g in self.snapshot_gpus(node)]})")
            gpu = min(fitting, key=lambda i: (self.free_gb(node, i), i))
        elif not 0 <= gpu < len(self._totals[node]):
            raise ValueError(f"node {node} has no GPU {gpu}")
        free = self.free_gb(node, gpu)
        if free < gb:
            raise ValueError(f"GPU {gpu} of node {node} has {free} GB free, {gb} GB requested")
        if free - gb <= ABSORB_LEFTOVER_GB:
            gb = free
        claim = Claim(id=next(self._ids), node=node, gpu=gpu, gb=gb)
        self._snapshots.pop(node, None)
        self._used[node][gpu] += gb
        self._holders[node][gpu] += 1
        self._claims[claim.id] = claim
        return claim

    def adopt(self, node: str, gpu: int, gb: float) -> Claim:
        """Book exactly ``gb`` on ``gpu`` of ``node`` for a worker found running (a new control
        plane rebuilding the ledger from the cluster): what runs is a fact, so it is booked
        even where it exceeds the budget (the ledger then shows the GPU as full)."""
        self._node(node)
        if not 0 <= gpu < len(self._totals[node]):
            raise ValueError(f"node {node} has no GPU {gpu}")
        claim = Claim(id=next(self._ids), node=node, gpu=gpu, gb=gb)
        self._snapshots.pop(node, None)
        self._used[node][gpu] += gb
        self._holders[node][gpu] += 1
        self._claims[claim.id] = claim
        return claim

    def release(self, claim: Claim) -> None:
        """Give a claim's memory back; ValueError for an unknown or already released claim."""
        if self._claims.pop(claim.id, None) is None:
            raise ValueError(f"claim {claim.id} is unknown or already released")
        self._snapshots.pop(claim.node, None)
        self._used[claim.node][claim.gpu] -= claim.gb
        self._holders[claim.node][claim.gpu] -= 1

    def claims(self, nodes: Iterable[str] | None = None) -> tuple[Claim, ...]:
        """The live claims, optionally only those on the given nodes."""
        keep = None if nodes is None else set(nodes)
        return tuple(c for c in self._claims.values() if keep is None or c.node in keep)

    def _node(self, node: str) -> str:
        if node not in self._totals:
            raise ValueError(f"unknown node {node!r}")
        return node
