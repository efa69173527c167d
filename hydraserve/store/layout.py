"""Pipeline-stage layout: which layers and tensors each of p stages holds (PAPER.md 2.1).

The embedding belongs to stage 0, the final norm and lm_head to the last stage, and every decoder
layer goes to the currently lightest stage (ties to the later one); stages then take contiguous
layer ranges of those sizes. With tied embeddings (no ``lm_head.weight`` in the checkpoint) the
embedding matrix is needed, and counted, on both ends. Torch-free: the store and the control plane
use it too.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Mapping

from hydraserve.store.checkpoint import CheckpointError, TensorInfo

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(embed_tokens|embed_positions|project_in|wte|wpe|word_embeddings)\.")
_HEAD = re.compile(r"(?:^|\.)(lm_head|norm|final_layer_norm|project_out|ln_f)\.")
_TIED_EMBED = re.compile(r"(?:^|\.)(embed_tokens|wte|word_embeddings)\.weight$")


class Role(enum.Enum):
    EMBED = "embed"
    LAYER = "layer"
    HEAD = "head"


def classify(name: str) -> tuple[Role, int]:
    """(role, layer index or -1) of a checkpoint tensor name."""
    m = _LAYER.search(name)
    if m:
        return Role.LAYER, int(m.group(1))
    if _EMBED.search(name):
        return Role.EMBED, -1
    if _HEAD.search(name):
        return Role.HEAD, -1
    raise CheckpointError(f"tensor {name!r} belongs to no pipeline stage (unknown naming)")


@dataclass(frozen=True)
class StageSpec:
    """Stage ``rank`` of a ``p``-stage pipeline holding decoder layers [layer_start, layer_end)."""

    rank: int
    p: int
    layer_start: int
    layer_end: int

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.p - 1

    @property
    def layers(self) -> range:
        return range(self.layer_start, self.layer_end)

    def holds(self, role: Role, layer: int) -> bool:
        if role is Role.LAYER:
            return self.layer_start <= layer < self.layer_end
        return self.is_first if role is Role.EMBED else self.is_last


def split_layers(layer_bytes: list[int], embed_bytes: int, head_bytes: int, p: int) -> list[range]:
    """Contiguous layer ranges for p stages by the paper's greedy lightest-stage rule."""
    if p < 1:
        raise ValueError(f"pipeline size must be >= 1, got {p}")
    if p > len(layer_bytes):
        raise ValueError(f"cannot split {len(layer_bytes)} decoder layers into {p} stages")
    loads = [0] * p
    loads[0] += embed_bytes
    loads[-1] += head_bytes
    counts = [0] * p
    for size in layer_bytes:
        lightest = min(loads)
        stage = max(i for i, load in enumerate(loads) if load == lightest)  # ties -> later stage
        loads[stage] += size
        counts[stage] += 1
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


class StageLayout:
    """The stage split of one checkpoint, computed from its tensor table alone."""

    def __init__(self, tensors: Mapping[str, TensorInfo]):
        self.tensors = dict(tensors)
        self.roles = {name: classify(name) for name in self.tensors}
        layer_ids = sorted({i for role, i in self.roles.values() if role is Role.LAYER})
        if not layer_ids or layer_ids != list(range(len(layer_ids))):
            raise CheckpointError("checkpoint decoder layers are missing or not numbered 0..L-1")
        self.num_layers = len(layer_ids)
        self.tied = not any(re.search(r"(?:^|\.)lm_head\.", n) for n in self.tensors)
        self.tied_embedding = next((n for n in self.tensors if _TIED_EMBED.search(n)), None)

    def _bytes(self, role: Role, layer: int = -1) -> int:
        return sum(t.nbytes for n, t in self.tensors.items() if self.roles[n] == (role, layer))

    def stages(self, p: int) -> list[StageSpec]:
        layer_bytes = [self._bytes(Role.LAYER, i) for i in range(self.num_layers)]
        embed = self._bytes(Role.EMBED)
        head = self._bytes(Role.HEAD)
        if self.tied and self.tied_embedding:
            head += self.tensors[self.tied_embedding].nbytes
        return [StageSpec(r, p, rng.start, rng.stop)
                for r, rng in enumerate(split_layers(layer_bytes, embed, head, p))]

    def stage(self, rank: int, p: int) -> StageSpec:
        if not 0 <= rank < p:
            raise ValueError(f"rank {rank} is outside a pipeline of {p} stages")
        return self.stages(p)[rank]

    def tensor_names(self, spec: StageSpec) -> list[str]:
        """Names of the checkpoint tensors stage ``spec`` holds, in checkpoint order."""
        head_embed = self.tied_embedding if spec.is_last and self.tied else None
        return [n for n in self.tensors if spec.holds(*self.roles[n]) or n == head_embed]

    def rest_names(self, spec: StageSpec) -> list[str]:
        """Tensors a stage lacks to become the whole model (its consolidation fetch)."""
        held = set(self.tensor_names(spec))
        return [n for n in self.tensors if n not in held]
