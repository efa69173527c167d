"""The OpenAI sampling parameters in the engine, each against an independent reference:
logprobs (of sampled and prompt tokens) against Hugging Face transformers within 1e-4 in
float32; presence/frequency/repetition penalties, logit_bias and min_tokens against a reference
written here from their OpenAI (and vLLM) definitions, on transformers' logits; n choices that
share one prompt's prefill and KV blocks give what separate runs give; choice j of a seeded
request is its own stream, reproducible and independent of the batch."""
from __future__ import annotations

import pytest
import torch

from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.sequence import SamplingParams
from hydraserve.make_model import ModelSpec, make_model

from sampling_reference import greedy, hf_logits

PROMPTS = [[5, 9, 33, 70, 2, 18, 44, 91, 7, 120, 3, 77, 15, 250, 8, 61, 30, 11, 4],
           [100, 200, 300, 7, 8, 9]]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # a held model of its own (no other test changes it): llama, float32
    return str(make_model(tmp_path_factory.mktemp("params") / "m",
                          ModelSpec(arch="llama", hidden=64, layers=4, heads=4, kv_heads=2,
                                    vocab=512, seed=21)))


@pytest.fixture(scope="module")
def hf(transformers, model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def test_logprobs_of_greedy_tokens_match_transformers(hf, model_dir):
    engine = LLMEngine(model_dir, pipeline=2)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    for prompt, res in zip(PROMPTS, engine.generate(PROMPTS, params)):
        ids = prompt + res.token_ids
        ref = torch.log_softmax(hf_logits(hf, ids), dim=-1)
        # the sampled tokens: each one's logprob and the top 5 at its position
        for i, (tok, extra) in enumerate(zip(res.token_ids, res.extras)):
            row = ref[len(prompt) - 1 + i]
            assert tok == int(row.argmax())
            assert abs(extra["logprob"] - float(row[tok])) < 1e-4
            top_ids = [t for t, _ in extra["top_logprobs"]]
            assert top_ids == row.topk(5).indices.tolist()
            for t, lp in extra["top_logprobs"]:
                assert abs(lp - float(row[t])) < 1e-4
        # the prompt's tokens, with the first token only
        entries = res.extras[0]["prompt_logprobs"]
        assert len(entries) == len(prompt) and entries[0] is None
        for pos in range(1, len(prompt)):
            lp, top = entries[pos]
            assert abs(lp - float(ref[pos - 1, prompt[pos]])) < 1e-4
            assert [t for t, _ in top] == ref[pos - 1].topk(3).indices.tolist()
        assert all("prompt_logprobs" not in e for e in res.extras[1:])


PROCESSED = {
    "frequency": SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=1.5),
    "presence": SamplingParams(max_tokens=24, ignore_eos=True, presence_penalty=2.0),
    "negative frequency": SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=-2.0),
    "repetition": SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=1.8),
    "repetition below 1": SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=0.6),
    "all penalties": SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=0.4,
                                    presence_penalty=0.6, repetition_penalty=1.3),
    "logit_bias": SamplingParams(max_tokens=16, ignore_eos=True,
                                 logit_bias=((7, 3.0), (322, -100.0), (300, 2.5))),
}


@pytest.mark.parametrize("name", list(PROCESSED))
def test_penalties_and_logit_bias_match_their_definitions(hf, model_dir, name):
    params = PROCESSED[name]
    plain = SamplingParams(max_tokens=params.max_tokens, ignore_eos=True)
    engine = LLMEngine(model_dir, pipeline=3)
    changed = False
    for prompt in PROMPTS:
        ours = engine.generate([prompt], params)[0].token_ids
        assert ours == greedy(hf, prompt, params, set()), name
        changed |= ours != engine.generate([prompt], plain)[0].token_ids
    assert changed, f"{name} changes no output: the test would prove nothing"


def test_min_tokens_holds_back_eos_and_stop_ids(hf, model_dir):
    engine = LLMEngine(model_dir)
    prompt = PROMPTS[1]
    free = engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    stop = free[2]  # a token the model picks third: a stop id that ends the plain run early
    ended = engine.generate([prompt], SamplingParams(max_tokens=10, stop_token_ids=(stop,)))[0]
    assert ended.token_ids == free[:3] and ended.finish_reason.value == "stop"
    eos = set(engine.model_cfg.eos_token_ids)
    params = SamplingParams(max_tokens=10, stop_token_ids=(stop,), min_tokens=6)
    held = engine.generate([prompt], params)[0].token_ids
    assert len(held) >= 6 and stop not in held[:6]
    assert held == greedy(hf, prompt, params, eos)


def test_n_choices_share_the_prompt_blocks_and_match_separate_runs(model_dir):
    prompt = PROMPTS[0] * 3  # 57 tokens: three full blocks of 16 to share
    choices = [SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.8, seed=4, choice=j)
               for j in range(4)]
    engine = LLMEngine(model_dir, pipeline=2)
    together = engine.generate([prompt] * 4, choices)
    shared_peak = engine.scheduler.peak_blocks_used
    alone = [LLMEngine(model_dir).generate([prompt], c)[0].token_ids for c in choices]
    assert [r.token_ids for r in together] == alone
    assert len({tuple(t) for t in alone}) == 4  # the choices differ from one another
    # four sequences of 57 + 20 tokens hold 5 blocks each; sharing 3 saves 9
    assert shared_peak == 4 * 5 - 3 * 3
    assert engine.scheduler.allocator.num_free == engine.num_blocks


def test_a_choice_is_reproducible_and_independent_of_its_batch(model_dir):
    engine = LLMEngine(model_dir)
    sp = SamplingParams(max_tokens=16, ignore_eos=True, temperature=1.0, seed=11, choice=2)
    alone = engine.generate([PROMPTS[1]], sp)[0].token_ids
    crowded = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[1][:3]],
                              [SamplingParams(max_tokens=30, ignore_eos=True), sp,
                               SamplingParams(max_tokens=5, temperature=1.0)])[1].token_ids
    assert alone == crowded
    other = engine.generate([PROMPTS[1]], SamplingParams(
        max_tokens=16, ignore_eos=True, temperature=1.0, seed=11, choice=3))[0].token_ids
    assert other != alone


@pytest.mark.parametrize("bad", [dict(min_tokens=20, max_tokens=10), dict(presence_penalty=2.5),
                                 dict(repetition_penalty=0), dict(logprobs=21),
                                 dict(logit_bias=((1, 101.0),)), dict(choice=-1)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_every_parameter_is_the_same_on_four_stages(model_dir):
    """p = 4 (in-process stages, hidden states handed on as between worker processes) against
    p = 1: tokens identical, logprobs within 1e-5."""
    one, four = LLMEngine(model_dir), LLMEngine(model_dir, pipeline=4)
    cases = [*PROCESSED.values(),
             SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2),
             SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9, seed=3, choice=1,
                            top_k=20, top_p=0.9, presence_penalty=0.5),
             SamplingParams(max_tokens=12, min_tokens=8, stop_token_ids=(5, 9))]
    for params in cases:
        a, b = one.generate(PROMPTS, params), four.generate(PROMPTS, params)
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids, params
            for ex, ey in zip(x.extras, y.extras):
                if ex is not None:
                    assert abs(ex["logprob"] - ey["logprob"]) < 1e-5
