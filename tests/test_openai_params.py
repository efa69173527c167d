"""The OpenAI parameters through the official openai client (sync and async, streaming and
not) against a real `hydraserve serve` process on the default model (SmolLM2-135M-Instruct),
plus a held test model that transformers checks: n and batched prompts, seeds per choice,
logprobs and echo (against transformers within 1e-4), penalties, logit_bias and min_tokens
(against the definitions), and the refusals a client meets."""
from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
import torch
import yaml

from hydraserve.engine.sequence import SamplingParams
from hydraserve.make_model import ModelSpec, make_model
from hydraserve.store.launch import ServerProcess

from sampling_reference import greedy, hf_logits

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.multiprocess

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> str:
    return str(make_model(tmp_path_factory.mktemp("held") / "held",
                          ModelSpec(arch="llama", hidden=64, layers=4, heads=4, kv_heads=2,
                                    vocab=512, seed=31)))


@pytest.fixture(scope="module")
def server(tmp_path_factory, held):
    from hydraserve.cli import _default_model

    tmp = tmp_path_factory.mktemp("params-gw")
    models = {"models": [{"name": SMOL, "path": _default_model(), "ttft_slo_s": 30},
                         {"name": "held", "path": held, "ttft_slo_s": 30,
                          "owned_by": "tests"}]}
    (tmp / "models.yaml").write_text(yaml.safe_dump(models))
    server = ServerProcess(["serve", "--models", str(tmp / "models.yaml"), "--port", "0",
                            "--keep-alive", "120", "--log-dir", str(tmp / "logs")],
                           tmp / "gateway.log", timeout=120)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def hf(held):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(held, dtype=torch.float32)
    model.eval()
    return model


def _ids(tokens: list[str]) -> list[int]:
    """Token names under return_tokens_as_token_ids -> ids."""
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.split(":", 1)[1]) for t in tokens]


def test_batched_prompts_times_n_are_indexed_and_seeded_per_choice(client):
    kw = dict(model=SMOL, prompt=["The capital of France is", "1, 2, 3,"], n=3,
              max_tokens=8, temperature=0.9, seed=17, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert a.usage.completion_tokens == 6 * 8
    assert a.usage.prompt_tokens == sum(len(client_tokenize(client, p)) for p in kw["prompt"])
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the seed fixes them all
    first = [c.text for c in a.choices[:3]]
    assert len(set(first)) == 3, first  # choice j is its own draw
    alone = client.completions.create(**{**kw, "prompt": "The capital of France is", "n": 1})
    assert alone.choices[0].text == a.choices[0].text  # choice 0 alone is choice 0 in a batch


def client_tokenize(client, prompt: str) -> list[int]:
    url = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
    req = urllib.request.Request(url + "/tokenize", data=json.dumps(
        {"model": SMOL, "prompt": prompt}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = json.loads(r.read())
    assert body["count"] == len(body["tokens"])
    return body["tokens"]


def test_chat_stream_with_n_and_logprobs_equals_the_whole_answer(client):
    kw = dict(model=SMOL, messages=[{"role": "user", "content": "Name three colours."}], n=2,
              max_tokens=12, temperature=0.7, seed=5, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kw)
    texts, entries, roles = {0: "", 1: ""}, {0: [], 1: []}, set()
    usage = None
    for chunk in client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.add(ch.index)
            texts[ch.index] += ch.delta.content or ""
            if ch.logprobs and ch.logprobs.content:
                entries[ch.index] += ch.logprobs.content
    assert roles == {0, 1}
    for c in whole.choices:
        assert texts[c.index] == c.message.content
        ref = c.logprobs.content
        assert [e.token for e in entries[c.index]] == [e.token for e in ref]
        assert [e.logprob for e in entries[c.index]] == [e.logprob for e in ref]
        assert all(len(e.top_logprobs) == 3 for e in ref)
        # the bytes add up to the text (an EOS token has a logprob entry, and no text)
        raw = b"".join(bytes(e.bytes) for e in ref).decode()
        assert raw.removesuffix("<|im_end|>") == c.message.content
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_logprobs_and_echo_match_transformers(client, hf):
    prompt = [5, 9, 33, 70, 2, 18, 44, 91, 7, 120]
    r = client.completions.create(model="held", prompt=prompt, max_tokens=10, temperature=0,
                                  logprobs=4, echo=True,
                                  extra_body={"ignore_eos": True,
                                              "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    ids = _ids(lp.tokens)
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 10
    ref = torch.log_softmax(hf_logits(hf, ids), dim=-1)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, len(ids)):
        row = ref[pos - 1]
        if pos >= len(prompt):
            assert ids[pos] == int(row.argmax())  # greedy
        assert abs(lp.token_logprobs[pos] - float(row[ids[pos]])) < 1e-4
        top = {int(k.split(":")[1]): v for k, v in lp.top_logprobs[pos].items()}
        for t in row.topk(4).indices.tolist():
            assert abs(top[t] - float(row[t])) < 1e-4
    assert lp.text_offset == sorted(lp.text_offset)


@pytest.mark.parametrize("extra", [{"frequency_penalty": 1.2, "presence_penalty": 0.5},
                                   {"repetition_penalty": 1.5},
                                   {"logit_bias": {"7": 100}},
                                   {"min_tokens": 8, "stop_token_ids": [3, 11, 40]}])
def test_penalties_bias_and_min_tokens_match_their_definitions(client, hf, extra):
    prompt = [100, 200, 300, 7, 8, 9, 100, 200]
    body = {"return_tokens_as_token_ids": True, **extra}
    if "min_tokens" not in extra:
        body["ignore_eos"] = True
    top = {k: extra.pop(k) for k in ("frequency_penalty", "presence_penalty", "logit_bias")
           if k in extra}
    r = client.completions.create(model="held", prompt=prompt, max_tokens=16, temperature=0,
                                  logprobs=0, extra_body={**body, **extra}, **top)
    ours = _ids(r.choices[0].logprobs.tokens)
    params = SamplingParams(
        max_tokens=16, ignore_eos="min_tokens" not in body, **{
            k: (tuple((int(t), float(b)) for t, b in v.items()) if k == "logit_bias" else
                tuple(v) if k == "stop_token_ids" else v)
            for k, v in body.items() if k not in ("return_tokens_as_token_ids", "ignore_eos")})
    assert ours == greedy(hf, prompt, params, {0} if "min_tokens" in body else set())


def test_async_client_streams_echo_and_logprobs(server):
    async def run():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0,
                               timeout=180)
        kw = dict(model=SMOL, prompt="Once upon a time", max_tokens=8, temperature=0, echo=True,
                  logprobs=2)
        whole = await c.completions.create(**kw)
        text, tokens = "", []
        async for chunk in await c.completions.create(**kw, stream=True):
            for ch in chunk.choices:
                text += ch.text
                if ch.logprobs:
                    tokens += ch.logprobs.tokens
        await c.close()
        return whole, text, tokens

    whole, text, tokens = asyncio.run(run())
    assert whole.choices[0].text.startswith("Once upon a time")
    assert text == whole.choices[0].text
    assert tokens == whole.choices[0].logprobs.tokens


def test_what_a_client_cannot_have_is_refused_naming_it(client):
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=SMOL, messages=msgs, **kw)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert "image_url" in e.value.body["message"]
    ok = client.chat.completions.create(model=SMOL, messages=msgs, max_tokens=2,
                                        response_format={"type": "text"})
    assert ok.choices[0].message.content is not None


def test_models_tokenize_and_version(server, client):
    models = {m.id: m for m in client.models.list().data}
    assert models["held"].owned_by == "tests" and models[SMOL].owned_by == "hydraserve"
    assert models[SMOL].model_extra["max_model_len"] > 0
    with urllib.request.urlopen(server.url + "/version", timeout=30) as r:
        assert json.loads(r.read())["version"]
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    req = urllib.request.Request(server.url + "/tokenize", data=json.dumps(
        {"model": SMOL, "messages": msgs}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        count = json.loads(r.read())["count"]
    answer = client.chat.completions.create(model=SMOL, messages=msgs, max_tokens=1)
    assert answer.usage.prompt_tokens == count
