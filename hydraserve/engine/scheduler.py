"""Continuous batching under a fixed KV budget (lives on the head stage).

Each step runs every running sequence's next token plus as many waiting prompts as the token,
sequence and block budgets allow (prefill and decode in one batch). A sequence that cannot get a
block to grow preempts the most recently admitted one, whose blocks are freed and which is
recomputed later from its prompt and outputs so far. Sequences never over-allocate: a prompt
waits until its blocks are free.

Sequences of one prompt (the n choices of a request) share its prefill: the first to arrive
leads, and each later one, once the leader's prompt is in the cache, takes references to the
leader's full prompt blocks and computes only the rest of its prompt (less than a block).
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from itertools import count

from hydraserve.engine.batch import SampleSpec, StepBatch
from hydraserve.engine.config import EngineConfig
from hydraserve.engine.kv_cache import BlockAllocator
from hydraserve.engine.sequence import FinishReason, SamplingParams, Sequence, SeqStatus


@dataclass(frozen=True)
class TokenOutput:
    seq_id: int
    token_id: int
    finish_reason: FinishReason | None
    extra: dict | None = None  # the logprobs the sequence asked for (see sampler.Picks)


class Scheduler:
    def __init__(self, cfg: EngineConfig, num_blocks: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...] = ()):
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.max_model_len = max_model_len
        self.eos = set(eos_token_ids)
        self.allocator = BlockAllocator(num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self._ids = count()
        self._steps = count()
        self._leaders: dict[tuple[int, ...], int] = {}  # prompt -> the live sequence leading it
        self.peak_blocks_used = 0
        self.num_preemptions = 0

    # -- requests ----------------------------------------------------------------------------
    def add(self, prompt_ids: list[int], params: SamplingParams,
            output_ids: list[int] | tuple[int, ...] = ()) -> int:
        """Queue a sequence. ``output_ids``: tokens it already produced (a stream resumed after
        its worker was lost): they are recomputed with the prompt and count towards max_tokens,
        and sampling continues at output index len(output_ids), so with the same seed the rest
        of the stream is what an uninterrupted run gives."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        total = len(prompt_ids) + len(output_ids)
        if total >= self.max_model_len:
            raise ValueError(f"the prompt has {total} tokens; the model length is "
                             f"{self.max_model_len}")
        if len(output_ids) >= params.max_tokens:
            raise ValueError(f"{len(output_ids)} tokens were produced already; max_tokens is "
                             f"{params.max_tokens}")
        if self._blocks_for(total + 1) > self.allocator.num_blocks:
            raise ValueError("the prompt does not fit the KV cache even when it is empty")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        seq = Sequence(next(self._ids), list(prompt_ids), params, seed,
                       output_ids=list(output_ids))
        if params.repetition_penalty != 1:
            seq.prompt_unique = tuple(sorted(set(prompt_ids)))
        if not output_ids and params.prompt_logprobs is None:
            key = tuple(prompt_ids)
            lead = self._leaders.get(key)
            if lead is not None and lead in self.seqs:
                seq.leader = lead
            else:
                self._leaders[key] = seq.seq_id
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)
        return seq.seq_id

    def abort(self, seq_id: int) -> None:
        seq = self.seqs.get(seq_id)
        if seq is None or seq.status is SeqStatus.FINISHED:
            return
        seq.finish_reason = FinishReason.ABORT
        if not seq.in_flight:
            self._finish(seq)
        else:
            seq.status = SeqStatus.FINISHED  # freed when its step comes back

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling --------------------------------------------------------------------------
    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _grow(self, seq: Sequence, n_tokens: int) -> bool:
        need = self._blocks_for(n_tokens) - len(seq.block_ids)
        if need > self.allocator.num_free:
            return False
        if need > 0:
            seq.block_ids += self.allocator.allocate(need)
        used = self.allocator.num_blocks - self.allocator.num_free
        self.peak_blocks_used = max(self.peak_blocks_used, used)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.allocator.free(seq.block_ids)
        seq.block_ids, seq.num_computed, seq.status = [], 0, SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> StepBatch | None:
        chosen: list[Sequence] = []
        budget = self.cfg.max_num_batched_tokens
        for seq in list(self.running):
            if seq.in_flight or seq not in self.running:
                continue
            while not self._grow(seq, len(seq)):
                victims = [s for s in self.running if not s.in_flight and s not in chosen]
                victim = victims[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                chosen.append(seq)
                budget -= len(seq) - seq.num_computed
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            shared = self._shared_prefix(seq)
            if shared is None:
                break  # its leader's prefill is in flight: it shares it next step
            if shared:
                self.allocator.share(shared)
                seq.block_ids, seq.num_computed = list(shared), len(shared) * self.block_size
            n = len(seq) - seq.num_computed
            if (n > budget and chosen) or not self._grow(seq, len(seq)):
                if shared:
                    self.allocator.free(seq.block_ids)
                    seq.block_ids, seq.num_computed = [], 0
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chosen.append(seq)
            budget -= n
        if not chosen:
            return None
        for seq in chosen:
            seq.in_flight = True
        return StepBatch(
            step_id=next(self._steps),
            seq_ids=[s.seq_id for s in chosen],
            q_lens=[len(s) - s.num_computed for s in chosen],
            ctx_lens=[len(s) for s in chosen],
            block_tables=[list(s.block_ids) for s in chosen],
            token_ids=[t for s in chosen for t in s.all_ids[s.num_computed:]],
            samples=[self._sample_spec(s) for s in chosen],
        )

    def _shared_prefix(self, seq: Sequence) -> list[int] | None:
        """The leader's full prompt blocks ``seq`` takes over; [] if it computes its own
        prompt; None if it should wait a step for its leader's prefill to come back."""
        if seq.leader is None:
            return []
        lead = self.seqs.get(seq.leader)
        nblocks = (len(seq.prompt_ids) - 1) // self.block_size  # one token at least is left
        if lead is None or lead.status is not SeqStatus.RUNNING or nblocks == 0:
            seq.leader = None  # gone, preempted or finished: compute the prompt alone
            return []
        if lead.num_computed >= nblocks * self.block_size:
            return lead.block_ids[:nblocks]
        return None

    def _sample_spec(self, s: Sequence) -> SampleSpec:
        p, i = s.params, len(s.output_ids)
        banned: tuple[int, ...] = ()
        if i < p.min_tokens:
            banned = tuple(sorted((set() if p.ignore_eos else self.eos) | set(p.stop_token_ids)))
        return SampleSpec(
            p.temperature, p.top_p, p.top_k, s.seed, i, choice=p.choice, bias=p.logit_bias,
            banned=banned, presence=p.presence_penalty, frequency=p.frequency_penalty,
            repetition=p.repetition_penalty,
            output=tuple(s.output_ids) if p.penalized else (),
            prompt=s.prompt_unique if p.repetition_penalty != 1 else (), logprobs=p.logprobs,
            prompt_logprobs=p.prompt_logprobs if i == 0 and s.num_computed == 0 else None)

    def update(self, batch: StepBatch, tokens: list[int]) -> list[TokenOutput]:
        """Apply the sampled tokens of ``batch``; return what each sequence produced."""
        outs = []
        for seq_id, q, tok in zip(batch.seq_ids, batch.q_lens, tokens):
            seq = self.seqs[seq_id]
            seq.in_flight = False
            if seq.status is SeqStatus.FINISHED:  # aborted while in flight
                self._finish(seq)
                continue
            seq.num_computed += q
            seq.output_ids.append(tok)
            reason = None
            p = seq.params
            if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
                reason = FinishReason.STOP
            elif len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                seq.finish_reason = reason
                self._finish(seq)
            outs.append(TokenOutput(seq_id, tok, reason))
        return outs

    def _finish(self, seq: Sequence) -> None:
        seq.status = SeqStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        del self.seqs[seq.seq_id]
        key = tuple(seq.prompt_ids)
        if self._leaders.get(key) == seq.seq_id:
            del self._leaders[key]
