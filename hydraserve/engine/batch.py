"""One engine step's batch: a plain, serialisable description every stage receives.

The head's scheduler builds a :class:`StepBatch`; each stage turns it into tensors
(:func:`attention_metadata`) for its own layers. Only plain ints and floats travel, so the same
object goes over a socket between worker processes as a small JSON header.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from hydraserve.engine.layers import AttentionMetadata, PrefillSlice


@dataclass(frozen=True)
class SampleSpec:
    """What the last stage needs to pick one sequence's next token (see SamplingParams).

    Everything the choice depends on travels here, so the last stage keeps no state per
    sequence and any stage (a pipeline's last, a consolidated worker) picks the same token."""

    temperature: float
    top_p: float
    top_k: int
    seed: int
    index: int  # output position i of the token being sampled
    choice: int = 0  # j: which of the request's n choices
    bias: tuple = ()  # logit_bias: (token id, bias) pairs
    banned: tuple = ()  # ids masked for this token (EOS and stop ids before min_tokens)
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    output: tuple = ()  # the output ids so far, when a penalty needs them
    prompt: tuple = ()  # the distinct prompt ids, when repetition_penalty needs them
    logprobs: int | None = None  # report the chosen token's logprob and the top k
    prompt_logprobs: int | None = None  # this step prefills the whole prompt: report its logprobs

    @property
    def processed(self) -> bool:
        """Whether the logits are changed before the choice."""
        return bool(self.bias or self.banned or self.presence or self.frequency
                    or self.repetition != 1)


@dataclass
class StepBatch:
    step_id: int
    seq_ids: list[int]
    q_lens: list[int]  # new tokens per sequence in this step
    ctx_lens: list[int]  # context length per sequence including the new tokens
    block_tables: list[list[int]]
    token_ids: list[int]  # the new tokens, flattened in sequence order (used by stage 0)
    samples: list[SampleSpec]

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StepBatch":
        return cls(**{**d, "samples": [SampleSpec(**s) for s in d["samples"]]})


def _slots(block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, nblocks] block ids -> [B, nblocks * block_size] cache slots."""
    offs = torch.arange(block_size)
    return (block_tables[:, :, None] * block_size + offs).flatten(1)


def attention_metadata(batch: StepBatch, block_size: int, window: int | None,
                       device: torch.device) -> AttentionMetadata:
    positions, slot_rows, decode_idx, decode_rows, prefills, last_rows = [], [], [], [], [], []
    row = 0
    for i, (q, ctx, table) in enumerate(zip(batch.q_lens, batch.ctx_lens, batch.block_tables)):
        start = ctx - q
        positions.append(torch.arange(start, ctx))
        slot_rows.append(torch.tensor(table, dtype=torch.long))
        if q == 1:
            decode_idx.append(i)
            decode_rows.append(row)
        else:
            prefills.append((i, row, row + q, start, ctx))
        row += q
        last_rows.append(row - 1)
    pos = torch.cat(positions)
    max_blocks = max(len(t) for t in batch.block_tables)
    tables = torch.zeros(len(batch.seq_ids), max_blocks, dtype=torch.long)
    for i, t in enumerate(slot_rows):
        tables[i, :len(t)] = t
    all_slots = _slots(tables, block_size)  # [B, max_blocks * block_size]
    seq_of_row = torch.repeat_interleave(torch.arange(len(batch.q_lens)), torch.tensor(batch.q_lens))
    slot_mapping = all_slots[seq_of_row, pos]

    d_rows = d_slots = d_mask = None
    if decode_idx:
        idx = torch.tensor(decode_idx)
        ctx = torch.tensor(batch.ctx_lens)[idx]
        nblk = -(-int(ctx.max()) // block_size)
        d_slots = tables[idx, :nblk]  # whole blocks: gathered block by block
        k_pos = torch.arange(nblk * block_size)
        mask = k_pos[None, :] < ctx[:, None]
        if window is not None:
            mask &= k_pos[None, :] > (ctx[:, None] - 1 - window)
        d_mask = mask[:, None, None, :]
        d_rows = torch.tensor(decode_rows)
    slices = []
    for i, r0, r1, start, ctx in prefills:
        fresh = start == 0
        q_pos = torch.arange(start, ctx)
        k_pos = torch.arange(ctx)
        mask = None
        if not fresh or (window is not None and ctx > window):
            mask = k_pos[None, :] <= q_pos[:, None]
            if window is not None:
                mask &= k_pos[None, :] > (q_pos[:, None] - window)
            mask = mask.to(device)
        ctx_slots = None if fresh else all_slots[i, :ctx].to(device)
        slices.append(PrefillSlice(r0, r1, fresh, ctx_slots, mask))
    to = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return AttentionMetadata(positions=to(pos), slot_mapping=to(slot_mapping),
                             decode_rows=to(d_rows), decode_blocks=to(d_slots),
                             decode_mask=to(d_mask), prefills=slices,
                             last_rows=to(torch.tensor(last_rows)), block_size=block_size,
                             window=window)
