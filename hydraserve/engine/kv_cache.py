"""Paged KV cache: a block allocator (on the head) and per-stage cache tensors.

Every stage of a pipeline holds the same number of blocks for its own layers, so the one block
table the head's scheduler keeps addresses the k/v of a token on every stage.
"""
from __future__ import annotations

import torch

from hydraserve.engine.config import ModelConfig


class BlockAllocator:
    """Free list of KV block ids."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


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
