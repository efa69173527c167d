"""Continuous batching, the KV budget, preemption and sampling."""
from __future__ import annotations

import pytest

from hydraserve.engine.config import EngineConfig
from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.sequence import FinishReason, SamplingParams

PROMPTS = [[5, 9, 13], [100, 200, 300, 400, 17, 18, 19, 20, 21, 22, 23], [42],
           list(range(30, 70)), [7, 7, 7, 7, 7]]


def _one_by_one(engine: LLMEngine, prompts, params):
    return [engine.generate([p], params)[0].token_ids for p in prompts]


def test_batch_equals_one_by_one(llama_dir):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    engine = LLMEngine(llama_dir, pipeline=2)
    single = _one_by_one(engine, PROMPTS, params)
    batched = [r.token_ids for r in engine.generate(PROMPTS, params)]
    assert batched == single
    assert len({tuple(s) for s in single}) == len(PROMPTS)


def test_requests_joining_midway_match(llama_dir):
    """A request added while others decode joins the running batch (prefill + decode in a step)."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine = LLMEngine(llama_dir)
    expected = _one_by_one(engine, PROMPTS[:2], params)
    a = engine.add_request(PROMPTS[0], params)
    got = {a: []}
    for _ in range(4):
        for out in engine.step():
            got[out.seq_id].append(out.token_id)
    b = engine.add_request(PROMPTS[1], params)
    got[b] = []
    mixed = False
    while engine.scheduler.has_unfinished():
        batch_before = len(engine.scheduler.running)
        outs = engine.step()
        mixed |= batch_before == 1 and len(outs) == 2
        for out in outs:
            got[out.seq_id].append(out.token_id)
    assert mixed
    assert [got[a], got[b]] == expected


def test_kv_budget_is_honoured_with_waiting_and_preemption(llama_dir):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    roomy = LLMEngine(llama_dir)
    expected = [r.token_ids for r in roomy.generate(PROMPTS, params)]
    # 6 blocks of 16 tokens: at most 96 cached tokens, far less than the 5 sequences need at once
    tight = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=6, block_size=16))
    assert tight.scheduler.allocator.num_blocks == 6
    assert [r.token_ids for r in tight.generate(PROMPTS, params)] == expected
    assert tight.scheduler.peak_blocks_used <= 6
    assert tight.scheduler.num_preemptions > 0  # the budget really bound
    assert tight.scheduler.allocator.num_free == 6  # everything given back
    for stage in tight.stages:
        assert all(k.shape[0] == 6 * 16 for k, _ in stage.kv.layers.values())


def test_prompt_larger_than_cache_is_rejected(llama_dir):
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=2, block_size=4))
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request(list(range(20)), SamplingParams())


def test_stop_tokens_and_max_tokens(llama_dir):
    engine = LLMEngine(llama_dir)
    free = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert free.finish_reason is FinishReason.LENGTH and len(free.token_ids) == 10
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    res = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, stop_token_ids=(stop,)))[0]
    assert res.finish_reason is FinishReason.STOP
    assert res.token_ids == free.token_ids[:first + 1]


def test_seeded_sampling_is_reproducible_across_pipelines_and_batches(llama_dir):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    one = LLMEngine(llama_dir)
    two = LLMEngine(llama_dir, pipeline=2)
    alone = one.generate([PROMPTS[0]], params)[0].token_ids
    assert two.generate(PROMPTS[:3], params)[0].token_ids == alone
    other = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=99)
    assert one.generate([PROMPTS[0]], other)[0].token_ids != alone
    greedy = one.generate([PROMPTS[0]], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    topk1 = SamplingParams(max_tokens=16, temperature=1.0, top_k=1, ignore_eos=True)
    assert one.generate([PROMPTS[0]], topk1)[0].token_ids == greedy.token_ids
    tiny_p = SamplingParams(max_tokens=16, temperature=1.0, top_p=1e-6, seed=5, ignore_eos=True)
    assert one.generate([PROMPTS[0]], tiny_p)[0].token_ids == greedy.token_ids


def test_invalid_sampling_params():
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_float32(llama_dir, dtype):
    import torch

    full = LLMEngine(llama_dir)
    half = LLMEngine(llama_dir, EngineConfig(dtype=dtype))
    a, b = full.prompt_logits(PROMPTS[3]), half.prompt_logits(PROMPTS[3])
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    res = half.generate([PROMPTS[3]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(res.token_ids) == 8


@pytest.mark.gpu
def test_cuda_pipeline_matches_cpu(llama_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cpu = [r.token_ids for r in LLMEngine(llama_dir).generate(PROMPTS, params)]
    gpu = LLMEngine(llama_dir, EngineConfig(device="cuda"), pipeline=2)
    assert [r.token_ids for r in gpu.generate(PROMPTS, params)] == cpu
