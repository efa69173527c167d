"""Token selection on the last stage: greedy, temperature, top-k, top-p, seeded.

Randomness is stateless: the generator for a sequence's i-th output token is seeded with
(seed, i), and sampling runs on the CPU, so the choice does not depend on the device, the batch
the sequence shares, or which worker (pipeline stage or consolidated) computes it.
"""
from __future__ import annotations

import torch

from hydraserve.engine.batch import SampleSpec

_MIX = 0x9E3779B97F4A7C15


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _MIX + index) % (2**63 - 1))


def sample(logits: torch.Tensor, specs: list[SampleSpec]) -> list[int]:
    """logits: [B, V] for the last token of each sequence -> one token id per sequence."""
    out = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(specs):
        if s.temperature == 0 or s.top_k == 1:
            continue
        x = logits[i].float().cpu() / s.temperature
        if 0 < s.top_k < x.numel():
            kth = torch.topk(x, s.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
            x = x.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(x, dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=_generator(s.seed, s.index)))
    return out
