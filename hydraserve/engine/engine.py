"""The engine loop in one process: schedule -> run the stages in order -> sample -> update.

``pipeline=p`` builds p stage runners with the paper's layer split and hands hidden states from
one to the next, exactly as separate worker processes do over sockets.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch

from hydraserve.engine.batch import StepBatch
from hydraserve.engine.config import EngineConfig, ModelConfig, num_kv_blocks
from hydraserve.engine.runner import StageRunner, iter_checkpoint
from hydraserve.engine.sampler import StepLogits, pick
from hydraserve.engine.scheduler import Scheduler, TokenOutput
from hydraserve.engine.sequence import FinishReason, SamplingParams
from hydraserve.store.checkpoint import scan_checkpoint
from hydraserve.store.layout import StageLayout, StageSpec


@dataclass
class GenerateResult:
    token_ids: list[int]
    finish_reason: FinishReason
    extras: list[dict | None] = field(default_factory=list)  # per token: logprobs asked for


class LLMEngine:
    def __init__(self, model_dir: str | Path, cfg: EngineConfig | None = None, pipeline: int = 1,
                 weights: Callable[[StageSpec], Iterable[tuple[str, torch.Tensor]]] | None = None):
        """``weights(spec)`` gives a stage's tensors (default: read them from ``model_dir``;
        a progressive region's ``iter_region`` streams them while they arrive)."""
        self.model_dir = Path(model_dir)
        self.cfg = cfg or EngineConfig()
        self.model_cfg = ModelConfig.from_dir(self.model_dir)
        self.layout = StageLayout(scan_checkpoint(self.model_dir))
        self.max_model_len = min(self.cfg.max_model_len, self.model_cfg.max_position)
        self.num_blocks = num_kv_blocks(self.model_cfg, self.cfg)
        self.stages = [StageRunner(self.model_cfg, spec, self.cfg, self.num_blocks,
                                   self.max_model_len) for spec in self.layout.stages(pipeline)]
        weights = weights or (lambda spec: iter_checkpoint(
            self.model_dir, self.layout.tensor_names(spec), self.layout.tensors))
        for stage in self.stages:
            stage.load(weights(stage.spec))
        self.scheduler = Scheduler(self.cfg, self.num_blocks, self.max_model_len,
                                   self.model_cfg.eos_token_ids)

    @property
    def pipeline(self) -> int:
        return len(self.stages)

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        return self.scheduler.add(prompt_ids, params)

    def step(self) -> list[TokenOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        picks = pick(self._forward(batch), batch.samples)
        extra = dict(zip(batch.seq_ids, picks.extras))
        return [replace(out, extra=extra[out.seq_id])
                for out in self.scheduler.update(batch, picks.tokens)]

    def _forward(self, batch: StepBatch) -> StepLogits:
        """Run the stages in order; the last-token logits of each sequence."""
        x = None
        for stage in self.stages:
            x = stage.execute(batch, x)
        return x

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[GenerateResult]:
        """Run prompts to completion together (continuous batching); results in prompt order.
        ``params``: one for all, or one per prompt."""
        each = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, each)]
        results = {i: GenerateResult([], FinishReason.ABORT) for i in ids}
        while self.scheduler.has_unfinished():
            for out in self.step():
                r = results[out.seq_id]
                r.token_ids.append(out.token_id)
                r.extras.append(out.extra)
                if out.finish_reason is not None:
                    r.finish_reason = out.finish_reason
        return [results[i] for i in ids]

    @torch.inference_mode()
    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits [V] of the next token after ``prompt_ids`` (a one-token request, for checks)."""
        seq_id = self.add_request(prompt_ids, SamplingParams(max_tokens=1))
        batch = self.scheduler.schedule()
        assert batch is not None and batch.seq_ids == [seq_id], "engine must be idle"
        logits = self._forward(batch).last
        self.scheduler.update(batch, pick(StepLogits(logits, {}), batch.samples).tokens)
        return logits[0]
