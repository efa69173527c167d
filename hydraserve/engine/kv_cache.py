"""Paged KV cache: a block allocator (on the head) and per-stage cache tensors.

Every stage of a pipeline holds the same number of blocks for its own layers, so the one block
table the head's scheduler keeps addresses the k/v of a token on every stage.
"""
from __future__ import annotations

import torch

from hydraserve.engine.config import ModelConfig


class BlockAllocator:
    """Free list of KV block ids, with a reference count per block: sequences of one prompt
    share its full blocks (see Scheduler), and a block is free once no sequence holds it."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more holder of ``blocks`` (allocated already)."""
        for b in blocks:
            if self._refs[b] < 1:
                raise ValueError(f"KV block {b} is not allocated")
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        released = []
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                released.append(b)
        self._free.extend(reversed(released))


class KVCache:
    """k and v tensors of one stage, per layer: [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_layers(self, layer_ids: range | list[int]) -> None:
        shape = (self.num_blocks * self.block_size, self.model.num_kv_heads, self.model.head_dim)
        for i in layer_ids:
            if i not in self.layers:
                self.layers[i] = (torch.zeros(shape, dtype=self.dtype, device=self.device),
                                  torch.zeros(shape, dtype=self.dtype, device=self.device))

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers.values())
