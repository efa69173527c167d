"""Token selection on the last stage: logit processing, greedy, temperature, top-k, top-p,
seeded, and the log-probabilities a request asks for.

Randomness is stateless: the generator for output token i of choice j of a request is seeded
with (seed, j, i), and sampling runs on the CPU, so the choice does not depend on the device, the
batch the sequence shares, or which worker (pipeline stage or consolidated) computes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from hydraserve.engine.batch import SampleSpec, StepBatch

_MIX = 0x9E3779B97F4A7C15
_MIX_CHOICE = 0xBF58476D1CE4E5B9
_ROWS = 256  # prompt positions turned into logits at a time (a [rows, vocab] float32 block)


class StepLogits(NamedTuple):
    """What the last stage computes for a step: the logits of each sequence's last token
    [B, V], and the prompt logprobs of the sequences that asked (batch position -> entries)."""

    last: torch.Tensor
    prompt: dict[int, list]


@dataclass
class Picks:
    """The tokens of a step, and per sequence what it asked to know about them (None, or
    {"logprob", "top_logprobs", "prompt_logprobs"} as far as asked)."""

    tokens: list[int]
    extras: list[dict | None]

    def to_json(self) -> dict:
        out: dict = {"tokens": self.tokens}
        if any(e is not None for e in self.extras):
            out["extras"] = self.extras
        return out


def _generator(seed: int, choice: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(
        (seed * _MIX + choice * _MIX_CHOICE + index) % (2**63 - 1))


def process(x: torch.Tensor, s: SampleSpec) -> torch.Tensor:
    """One sequence's float32 logits [V] after logit_bias, the min_tokens mask and the
    penalties (in that order, as vLLM applies them). Ids outside the vocabulary are ignored."""
    x = x.clone()
    v = x.numel()
    if s.bias:
        ids = torch.tensor([int(t) for t, _ in s.bias], dtype=torch.long)
        vals = torch.tensor([float(b) for _, b in s.bias], dtype=x.dtype)
        keep = ids < v
        x.index_add_(0, ids[keep], vals[keep])
    if s.banned:
        ids = torch.tensor([t for t in s.banned if t < v], dtype=torch.long)
        x[ids] = float("-inf")
    if s.repetition != 1 and (s.prompt or s.output):
        seen = torch.tensor(sorted({*s.prompt, *s.output}), dtype=torch.long)
        seen = seen[seen < v]
        old = x[seen]
        x[seen] = torch.where(old > 0, old / s.repetition, old * s.repetition)
    if (s.presence or s.frequency) and s.output:
        ids, counts = torch.unique(torch.tensor(s.output, dtype=torch.long), return_counts=True)
        keep = ids < v
        x[ids[keep]] -= counts[keep].to(x.dtype) * s.frequency + s.presence
    return x


def sample(logits: torch.Tensor, specs: list[SampleSpec]) -> list[int]:
    """logits: [B, V] for the last token of each sequence -> one token id per sequence."""
    out = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(specs):
        greedy = s.temperature == 0 or s.top_k == 1
        if greedy and not s.processed:
            continue
        x = logits[i].float().cpu()
        if s.processed:
            x = process(x, s)
        if greedy:
            out[i] = int(x.argmax())
            continue
        x = x / s.temperature
        if 0 < s.top_k < x.numel():
            kth = torch.topk(x, s.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
            x = x.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(x, dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=_generator(s.seed, s.choice, s.index)))
    return out


def _top(lp: torch.Tensor, k: int) -> list[list]:
    if k <= 0:
        return []
    vals, ids = torch.topk(lp, min(k, lp.numel()))
    return [[int(t), float(v)] for t, v in zip(ids.tolist(), vals.tolist())]


def pick(out: StepLogits, specs: list[SampleSpec]) -> Picks:
    """The step's tokens and, for the sequences that asked, their logprobs (of the model's raw
    distribution, as vLLM reports them by default)."""
    tokens = sample(out.last, specs)
    extras: list[dict | None] = []
    for i, (s, tok) in enumerate(zip(specs, tokens)):
        extra: dict = {}
        if s.logprobs is not None:
            lp = torch.log_softmax(out.last[i].float().cpu(), dim=-1)
            extra["logprob"] = float(lp[tok])
            extra["top_logprobs"] = _top(lp, s.logprobs)
        if i in out.prompt:
            extra["prompt_logprobs"] = out.prompt[i]
        extras.append(extra or None)
    return Picks(tokens, extras)


def prompt_logprobs(logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    ids: list[int], k: int) -> list:
    """Logprobs of a prompt's tokens from the last stage's hidden states of its prefill rows
    (``hidden``: [len(ids), H]; ``logits`` maps rows to logits): None for the first token, then
    [logprob of token t, top k at its position] for each later one."""
    entries: list = [None]
    nxt = torch.tensor(ids[1:], dtype=torch.long)
    for r0 in range(0, len(ids) - 1, _ROWS):
        r1 = min(r0 + _ROWS, len(ids) - 1)
        lp = torch.log_softmax(logits(hidden[r0:r1]).float().cpu(), dim=-1)
        chosen = lp.gather(1, nxt[r0:r1, None])[:, 0].tolist()
        for row, value in enumerate(chosen):
            entries.append([value, _top(lp[row], k)])
    return entries


def step_logits(batch: StepBatch, hidden: torch.Tensor, last_rows: torch.Tensor,
                logits: Callable[[torch.Tensor], torch.Tensor]) -> StepLogits:
    """The last stage's output for a step from its final hidden states [num_tokens, H]."""
    prompt = {}
    row = 0
    for i, (q, s) in enumerate(zip(batch.q_lens, batch.samples)):
        if s.prompt_logprobs is not None:
            prompt[i] = prompt_logprobs(logits, hidden[row:row + q],
                                        batch.token_ids[row:row + q], s.prompt_logprobs)
        row += q
    return StepLogits(logits(hidden[last_rows]).float(), prompt)
