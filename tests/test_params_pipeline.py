"""Every sampling parameter stays exact through the worker modes: requests with each one run
together on a p = 3 pipeline whose head consolidates while they stream and whose small KV cache
forces preemptions (recompute), and each gives what a p = 1 worker gives for the same seed,
token for token (logprobs within 1e-4); a stream resumed after a lost worker (its tokens so
far sent along) continues as the uninterrupted one, penalties and logprobs included. Real
worker processes, a real ring of sockets."""
from __future__ import annotations

import threading
import time

import pytest

from hydraserve.cluster.pipeline import GroupConfig, LocalPipeline
from hydraserve.engine.config import EngineConfig
from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.sequence import SamplingParams
from hydraserve.make_model import ModelSpec, make_model

pytestmark = pytest.mark.multiprocess

PROMPT = [17, 4, 250, 33, 91, 8, 120, 64, 5, 77, 300, 12, 45, 9, 210, 3, 66, 140, 29, 7]
N = 60
# (name, params): each run once, all together on the pipeline
CASES = [
    ("greedy logprobs", {"logprobs": 3, "prompt_logprobs": 2}),
    ("seeded choice 0", {"temperature": 0.9, "seed": 7}),
    ("seeded choice 2", {"temperature": 0.9, "seed": 7, "choice": 2}),
    ("top_k", {"temperature": 1.0, "top_k": 5, "seed": 3}),
    ("top_p", {"temperature": 1.0, "top_p": 0.8, "seed": 3, "logprobs": 1}),
    ("presence and frequency", {"temperature": 0.8, "seed": 1, "presence_penalty": 1.0,
                                "frequency_penalty": 0.5}),
    ("repetition", {"repetition_penalty": 1.4}),
    ("logit_bias", {"logit_bias": {"7": 4.0, "300": -100.0}, "temperature": 0.7, "seed": 2}),
    # 1005 is the greedy run's first token: without min_tokens it would stop at once
    ("min_tokens", {"min_tokens": 30, "stop_token_ids": [1005, 308, 740, 130, *range(100, 140)],
                    "ignore_eos": False}),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_model(tmp_path_factory.mktemp("pp") / "m",
                          ModelSpec(arch="llama", hidden=128, layers=6, vocab=1024, seed=13)))


def _body(params: dict, **more) -> dict:
    return {"prompt_ids": PROMPT, "max_tokens": N, "ignore_eos": True, **params, **more}


def _run(pipe: LocalPipeline, body: dict, out: list, stamps: list | None = None) -> None:
    for item in pipe.generate(**body):
        assert "error" not in item, item
        out.append(item)
        if stamps is not None:
            stamps.append(time.time())


@pytest.fixture(scope="module")
def reference(model):
    """Each case on a p = 1 worker, one at a time."""
    with LocalPipeline(GroupConfig(model, p=1, threads_per_worker=1)) as pipe:
        runs = {}
        for name, params in CASES:
            items: list = []
            _run(pipe, _body(params), items)
            runs[name] = items
        # a resumed stream: the tokens so far sent along, as the control plane does
        resumed = {}
        for name, params in CASES:
            whole = runs[name]
            cut = 23
            rest: list = []
            _run(pipe, _body(params, output_ids=[it["token_id"] for it in whole[:cut]]), rest)
            resumed[name] = whole[:cut] + rest
        yield runs, resumed


def _same_top(x: list, y: list, name: str) -> None:
    """Top logprobs rank by rank: the same logprob (within 1e-4) and the same token, except
    where two tokens tie: the model gives tokens 38 and 66 the very same float32 logprob at one
    step of the "top_p" case, and which of them topk ranks first depends on the batch's layout
    (a last-bit difference or the tie's order), not on the parameters."""
    assert len(x) == len(y), name
    for (t, v), (u, w) in zip(x, y):
        assert abs(v - w) < 1e-4, name
        assert t == u or abs(v - w) < 1e-5, (name, x, y)


def _same(a: list[dict], b: list[dict], name: str) -> None:
    assert [it["token_id"] for it in a] == [it["token_id"] for it in b], name
    assert [it["finish_reason"] for it in a] == [it["finish_reason"] for it in b], name
    for x, y in zip(a, b):
        assert ("logprob" in x) == ("logprob" in y), name
        if "logprob" in x:
            assert abs(x["logprob"] - y["logprob"]) < 1e-4, name
            _same_top(x["top_logprobs"], y["top_logprobs"], name)
        if "prompt_logprobs" in x:
            for e, f in zip(x["prompt_logprobs"][1:], y["prompt_logprobs"][1:]):
                assert abs(e[0] - f[0]) < 1e-4, name


def test_the_reference_is_the_engine_in_process(model, reference):
    """The p = 1 worker against the engine run in this process (an independent path)."""
    runs, _ = reference
    engine = LLMEngine(model)
    for name, params in CASES:
        p = dict(params)
        if "logit_bias" in p:
            p["logit_bias"] = tuple((int(k), v) for k, v in p["logit_bias"].items())
        if "stop_token_ids" in p:
            p["stop_token_ids"] = tuple(p["stop_token_ids"])
        res = engine.generate([PROMPT], SamplingParams(**{"max_tokens": N, "ignore_eos": True,
                                                          **p}))[0]
        assert res.token_ids == [it["token_id"] for it in runs[name]], name
    assert runs["seeded choice 0"] != runs["seeded choice 2"]
    assert len(runs["min_tokens"]) >= 30


def test_every_parameter_survives_a_resumed_stream(reference):
    runs, resumed = reference
    for name, _ in CASES:
        _same(resumed[name][:23], runs[name][:23], name)
        _same(resumed[name], runs[name], name)


def test_every_parameter_is_exact_through_a_consolidating_preempting_pipeline(model, reference):
    runs, _ = reference
    # 9 streams of 20 + 60 tokens need 45 blocks; 24 force preemptions
    cfg = GroupConfig(model, p=3, all_card=(0,), threads_per_worker=1,
                      engine=EngineConfig(num_kv_blocks=24))
    with LocalPipeline(cfg) as pipe:
        outs = {name: [] for name, _ in CASES}
        stamps = {name: [] for name, _ in CASES}
        threads = [threading.Thread(target=_run, args=(pipe, _body(params), outs[name],
                                                       stamps[name]), daemon=True)
                   for name, params in CASES]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not any(len(o) >= 2 for o in outs.values()):
            assert time.monotonic() < deadline, "no stream started"
            time.sleep(0.01)
        pipe.consolidate()
        for t in threads:
            t.join(180)
        health = pipe.health(0)
        assert health["standalone"], "the head did not consolidate"
        assert health["preemptions"] > 0, "the small cache forced no preemption"
        consolidated = health["timeline"]["consolidated"]
        assert any(s[-1] > consolidated for s in stamps.values()), \
            "every stream had ended before the consolidation: not mid-stream"
    for name, _ in CASES:
        _same(outs[name], runs[name], name)
