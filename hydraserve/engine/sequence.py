"""Requests inside the engine: sampling parameters and sequence state."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


MAX_LOGPROBS = 20  # the most top-logprobs one token reports (vLLM's default max_logprobs)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one sequence. ``temperature == 0`` is greedy.

    With ``seed`` set, the token chosen at output position i of choice j (``choice``: one of the
    n choices of a request) depends only on (seed, j, i) and the logits, so a request gives the
    same text on one worker, on a pipeline, and after it moved.

    The logits are processed in vLLM's order before the choice: ``logit_bias`` is added, EOS and
    ``stop_token_ids`` are masked while fewer than ``min_tokens`` tokens were produced, then
    ``repetition_penalty`` (vLLM's / CTRL's: a positive logit of a token seen in the prompt or
    the output is divided by it, a negative one multiplied), then OpenAI's
    ``frequency_penalty`` (times the token's count in the output) and ``presence_penalty`` (once
    if it occurs) are subtracted. ``logprobs`` (k): report the chosen token's log-probability
    and the k most likely tokens, from the model's raw distribution (before any processing);
    ``prompt_logprobs`` (k): the same for every prompt token, with the first output token."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    choice: int = 0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if self.choice < 0:
            raise ValueError("choice must be >= 0")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0")
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}]")

    @property
    def penalized(self) -> bool:
        """Whether the choice depends on the tokens so far (a penalty is set)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # eos or a stop token
    LENGTH = "length"  # max_tokens or the model length
    ABORT = "abort"


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # params.seed, or one drawn at admission
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose k/v are in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    in_flight: bool = False  # scheduled in a step whose tokens have not come back yet
    leader: int | None = None  # a live sequence of the same prompt whose full blocks it shares
    prompt_unique: tuple[int, ...] = ()  # the distinct prompt ids (for repetition_penalty)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
