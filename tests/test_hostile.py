"""Hostile and malformed requests against the gateway (FastAPI's test client; no request here
reaches a worker): each gets its status and an OpenAI-shaped error naming the field, and the
server is alive after all of them."""
from __future__ import annotations

import json

import pytest

from hydraserve.cluster.local import LocalCluster
from hydraserve.config import GatewayConfig, default_local_cluster
from hydraserve.gateway.openai_api import ChatBody, CompletionBody

OK = {"model": "m", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def deep(n: int) -> bytes:
    return b'{"model": "m", "prompt": "x", "x": ' + b"[" * n + b"]" * n + b"}"


def raw(body: dict) -> bytes:
    """``body`` as JSON bytes with non-ASCII escaped: a lone surrogate travels as "\\ud800", and
    NaN and Infinity as the bare literals Python's json reads."""
    return json.dumps(body).encode()


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


BAD = "\ud800"  # a lone UTF-16 surrogate: no UTF-8 encoding exists
TOOLS = "tool calling is not implemented"


# (name, path, body (dict, or raw bytes), status, param or None, a piece of the message)
CASES = [
    ("max_tokens past the context", "/v1/completions", {**OK, "max_tokens": 10**12}, 400,
     "max_tokens", "maximum context length is 3072"),
    ("max_tokens past the server's cap", "/v1/completions", {**OK, "max_tokens": 2000}, 400,
     "max_tokens", "at most 1024"),
    ("max_tokens zero", "/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens", None),
    ("max_tokens a float", "/v1/completions", {**OK, "max_tokens": 4.0}, 400, "max_tokens", None),
    ("max_tokens a string", "/v1/completions", {**OK, "max_tokens": "4"}, 400, "max_tokens",
     None),
    ("max_tokens a bool", "/v1/completions", {**OK, "max_tokens": True}, 400, "max_tokens", None),
    ("stream a string", "/v1/completions", {**OK, "stream": "yes"}, 400, "stream", None),
    ("stream a number", "/v1/completions", {**OK, "stream": 1}, 400, "stream", None),
    ("ignore_eos a string", "/v1/completions", {**OK, "ignore_eos": "true"}, 400, "ignore_eos",
     None),
    ("temperature a string", "/v1/completions", {**OK, "temperature": "0.5"}, 400,
     "temperature", None),
    ("temperature too high", "/v1/completions", {**OK, "temperature": 5}, 400, "temperature",
     None),
    ("top_p zero", "/v1/completions", {**OK, "top_p": 0}, 400, "top_p", None),
    ("n zero", "/v1/completions", {**OK, "n": 0}, 400, "n", None),
    ("n of 33", "/v1/completions", {**OK, "n": 33}, 400, "n", None),
    ("top_k a string", "/v1/completions", {**OK, "top_k": "many"}, 400, "top_k", None),
    ("top_k -2", "/v1/completions", {**OK, "top_k": -2}, 400, "top_k", None),
    ("min_tokens negative", "/v1/completions", {**OK, "min_tokens": -1}, 400, "min_tokens", None),
    ("min_tokens past max_tokens", "/v1/completions", {**OK, "min_tokens": 5}, 400, "min_tokens",
     "more than max_tokens"),
    ("chat min_tokens past max_completion_tokens", "/v1/chat/completions",
     {**CHAT, "max_completion_tokens": 2, "min_tokens": 3}, 400, "min_tokens", None),
    ("presence_penalty 3", "/v1/completions", {**OK, "presence_penalty": 3}, 400,
     "presence_penalty", None),
    ("frequency_penalty -2.5", "/v1/completions", {**OK, "frequency_penalty": -2.5}, 400,
     "frequency_penalty", None),
    ("repetition_penalty 0", "/v1/completions", {**OK, "repetition_penalty": 0}, 400,
     "repetition_penalty", None),
    ("repetition_penalty 11", "/v1/completions", {**OK, "repetition_penalty": 11}, 400,
     "repetition_penalty", None),
    ("temperature NaN", "/v1/completions", raw({**OK, "temperature": float("nan")}), 400,
     "temperature", None),
    ("top_p Infinity", "/v1/completions", raw({**OK, "top_p": float("inf")}), 400, "top_p", None),
    ("logit_bias key not a token id", "/v1/completions", {**OK, "logit_bias": {"abc": 1}}, 400,
     "logit_bias", "abc"),
    ("logit_bias key negative", "/v1/completions", {**OK, "logit_bias": {"-1": 1}}, 400,
     "logit_bias", None),
    ("logit_bias value 200", "/v1/completions", {**OK, "logit_bias": {"5": 200}}, 400,
     "logit_bias", None),
    ("logit_bias of 1025 entries", "/v1/completions",
     {**OK, "logit_bias": {str(i): 1 for i in range(1025)}}, 400, "logit_bias", None),
    ("stop_token_ids negative", "/v1/completions", {**OK, "stop_token_ids": [-1]}, 400,
     "stop_token_ids", None),
    ("stop_token_ids of 65", "/v1/completions", {**OK, "stop_token_ids": list(range(65))}, 400,
     "stop_token_ids", None),
    ("echo a string", "/v1/completions", {**OK, "echo": "yes"}, 400, "echo", None),
    ("return_tokens_as_token_ids a string", "/v1/completions",
     {**OK, "return_tokens_as_token_ids": "true"}, 400, "return_tokens_as_token_ids", None),
    ("seed a string", "/v1/completions", {**OK, "seed": "7"}, 400, "seed", None),
    ("seed too large", "/v1/completions", {**OK, "seed": 2**70}, 400, "seed", None),
    ("stop of five", "/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     None),
    ("stream_options.include_usage a string", "/v1/completions",
     {**OK, "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options",
     None),
    ("prompt missing", "/v1/completions", {"model": "m"}, 400, "prompt", None),
    ("prompt a number", "/v1/completions", {"model": "m", "prompt": 5}, 400, "prompt", None),
    ("prompt ids with a bool", "/v1/completions", {"model": "m", "prompt": [1, True]}, 400,
     "prompt", None),
    ("prompt ids outside the vocabulary", "/v1/completions", {"model": "m", "prompt": [10**6]},
     400, "prompt", "vocabulary"),
    ("prompt empty", "/v1/completions", {"model": "m", "prompt": []}, 400, "prompt", "empty"),
    ("prompt an empty token list", "/v1/completions", {"model": "m", "prompt": [[]]}, 400,
     "prompt", "empty"),
    ("prompt token lists with a string", "/v1/completions", {"model": "m", "prompt": [[1, "a"]]},
     400, "prompt", None),
    ("prompt of 65 prompts", "/v1/completions", {"model": "m", "prompt": ["x"] * 65}, 400,
     "prompt", "at most 64"),
    ("prompt texts and ids mixed", "/v1/completions", {"model": "m", "prompt": ["x", [1]]}, 400,
     "prompt", None),
    ("model missing", "/v1/completions", {"prompt": "x"}, 400, "model", None),
    ("model a number", "/v1/completions", {"model": 3, "prompt": "x"}, 400, "model", None),
    ("unknown model", "/v1/completions", {**OK, "model": "nope"}, 404, "model", "does not exist"),
    ("model a path", "/v1/completions", {**OK, "model": "../../etc/passwd"}, 404, "model", None),
    ("chat message without content", "/v1/chat/completions",
     {"model": "m", "messages": [{"role": "user"}]}, 400, "messages", "needs a content"),
    ("chat role unknown", "/v1/chat/completions",
     {"model": "m", "messages": [{"role": "root", "content": "x"}]}, 400, "messages", None),
    ("chat messages empty", "/v1/chat/completions", {"model": "m", "messages": []}, 400,
     "messages", None),
    ("chat content a number", "/v1/chat/completions",
     {"model": "m", "messages": [{"role": "user", "content": 5}]}, 400, "messages", None),
    ("chat max_completion_tokens past the context", "/v1/chat/completions",
     {**CHAT, "max_completion_tokens": 10**9}, 400, "max_tokens", "maximum context length"),
    ("body not JSON", "/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("body a list", "/v1/completions", b"[1, 2]", 400, None, None),
    ("body empty", "/v1/completions", b"", 400, None, None),
    ("body nested 10,000 deep", "/v1/completions", deep(10_000), 400, None, "deeper than 64"),
    ("body of 9 MB", "/v1/completions",
     json.dumps({**OK, "prompt": "x" * (9 * 2**20)}).encode(), 413, None, "larger than"),
    ("logprobs 21", "/v1/completions", {**OK, "logprobs": 21}, 400, "logprobs", None),
    ("logprobs a bool", "/v1/completions", {**OK, "logprobs": True}, 400, "logprobs", None),
    ("chat logprobs a number", "/v1/chat/completions", {**CHAT, "logprobs": 2}, 400, "logprobs",
     None),
    ("chat top_logprobs without logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2},
     400, "top_logprobs", "needs logprobs"),
    ("chat top_logprobs with logprobs false", "/v1/chat/completions",
     {**CHAT, "logprobs": False, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("chat top_logprobs 21", "/v1/chat/completions", {**CHAT, "logprobs": True,
                                                      "top_logprobs": 21}, 400, "top_logprobs",
     None),
    # fields this server does not implement: refused by name, never silently ignored
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools",
     TOOLS),
    ("tool_choice", "/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, 400, "tool_choice",
     TOOLS),
    ("functions", "/v1/chat/completions", {**CHAT, "functions": []}, 400, "functions", TOOLS),
    ("function_call", "/v1/chat/completions", {**CHAT, "function_call": "none"}, 400,
     "function_call", TOOLS),
    ("parallel_tool_calls", "/v1/chat/completions", {**CHAT, "parallel_tool_calls": False}, 400,
     "parallel_tool_calls", TOOLS),
    ("suffix", "/v1/completions", {**OK, "suffix": "end"}, 400, "suffix", "'suffix'"),
    ("best_of", "/v1/completions", {**OK, "best_of": 2}, 400, "best_of", "use n"),
    ("an unknown field", "/v1/completions", {**OK, "frobnicate": 1}, 400, "frobnicate",
     "the parameter 'frobnicate' is not supported"),
    ("an unknown field with a unicode name", "/v1/chat/completions", {**CHAT, "温度": 1}, 400,
     "温度", "'温度'"),
    ("messages on /v1/completions", "/v1/completions", {**OK, "messages": user("x")}, 400,
     "messages", "not supported"),
    ("prompt on /v1/chat/completions", "/v1/chat/completions", {**CHAT, "prompt": "x"}, 400,
     "prompt", "not supported"),
    ("stream_options with an unknown key", "/v1/completions",
     {**OK, "stream": True, "stream_options": {"continuous": True}}, 400, "stream_options",
     "unknown field 'continuous'"),
    ("response_format json_object", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format",
     "structured output is not supported"),
    ("response_format json_schema", "/v1/completions",
     {**OK, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format", "structured output is not supported"),
    ("response_format a string", "/v1/completions", {**OK, "response_format": "json"}, 400,
     "response_format", None),
    # chat messages: text only, no tool calls
    ("chat image_url part", "/v1/chat/completions",
     {**CHAT, "messages": user([{"type": "text", "text": "what is it?"},
                                {"type": "image_url", "image_url": {"url": "http://x/a.png"}}])},
     400, "messages", "content part type 'image_url' is not supported"),
    ("chat input_audio part", "/v1/chat/completions",
     {**CHAT, "messages": user([{"type": "input_audio", "input_audio": {"data": ""}}])}, 400,
     "messages", "text-only"),
    ("chat content list without a text part", "/v1/chat/completions",
     {**CHAT, "messages": user([])}, 400, "messages", "no text part"),
    ("chat text part with an extra key", "/v1/chat/completions",
     {**CHAT, "messages": user([{"type": "text", "text": "x", "cache": True}])}, 400, "messages",
     "unknown field 'cache'"),
    ("chat text part without text", "/v1/chat/completions",
     {**CHAT, "messages": user([{"type": "text"}])}, 400, "messages", None),
    ("chat tool_calls in an assistant message", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "x"},
                           {"role": "assistant", "content": None,
                            "tool_calls": [{"id": "1", "type": "function"}]}]}, 400, "messages",
     TOOLS),
    ("chat tool_call_id in a tool message", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "tool", "content": "42", "tool_call_id": "1"}]}, 400,
     "messages", TOOLS),
    ("chat message with an unknown key", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "x", "weight": 1}]}, 400, "messages",
     "unknown field 'weight'"),
    ("chat message refusal not empty", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "assistant", "content": "x", "refusal": "no"}]}, 400,
     "messages", "refusal"),
    ("chat message name a number", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "x", "name": 3}]}, 400, "messages", None),
    # text that UTF-8 cannot encode (answering it was a 500): refused, naming the field
    ("surrogate in the prompt", "/v1/completions", raw({**OK, "prompt": "a" + BAD}), 400,
     "prompt", "not valid Unicode"),
    ("surrogate in a stop string", "/v1/completions", raw({**OK, "stop": ["x", BAD]}), 400,
     "stop", "not valid Unicode"),
    ("surrogate in a message", "/v1/chat/completions", raw({**CHAT, "messages": user(BAD)}),
     400, "messages", "not valid Unicode"),
    ("surrogate in a content part", "/v1/chat/completions",
     raw({**CHAT, "messages": user([{"type": "text", "text": BAD}])}), 400, "messages", None),
    ("surrogate in the model name", "/v1/completions", raw({**OK, "model": BAD}), 400, "model",
     "not valid Unicode"),
    ("surrogate in a key", "/v1/completions", raw({**OK, BAD: 1}), 400, "\\ud800",
     "not valid Unicode"),
    ("surrogate in a nested key", "/v1/chat/completions",
     raw({**CHAT, "messages": [{"role": "user", "content": "x", BAD: 1}]}), 400, "messages",
     None),
    ("surrogate in the user", "/v1/completions", raw({**OK, "user": "\udfff"}), 400, "user",
     None),
    ("surrogate in a logit_bias key", "/v1/completions", raw({**OK, "logit_bias": {BAD: 1}}), 400,
     "logit_bias", None),
]

# bodies that pass validation (they reach the queue, which answers 429; see the fixture)
VALID = [
    ("completion with every parameter", "/v1/completions", {
        **OK, "n": 2, "top_k": 40, "min_tokens": 2, "stop": "hello world", "seed": 7,
        "stop_token_ids": [3], "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.2, "logit_bias": {"10": -100, "11": 2.5},
        "response_format": {"type": "text"}, "user": "u", "ignore_eos": True, "top_p": 0.9,
        "temperature": 0.7, "return_tokens_as_token_ids": False, "echo": False}),
    ("top_k 0 and -1 mean off", "/v1/completions", {**OK, "top_k": 0}),
    ("nulls are absent", "/v1/completions",
     {**OK, "temperature": None, "top_p": None, "stop": None, "n": None, "logit_bias": None,
      "seed": None, "stream_options": None, "suffix": None, "tools": None}),
    ("a chat with parameters", "/v1/chat/completions", {
        **CHAT, "max_tokens": None, "max_completion_tokens": 4, "top_k": -1, "n": 3,
        "response_format": {"type": "text"}, "stop": ["a", "b", "c", "d"]}),
    ("messages copied from a response", "/v1/chat/completions", {**CHAT, "messages": [
        {"role": "system", "content": "be brief", "name": "setup"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello", "refusal": None, "tool_calls": None,
         "function_call": None, "audio": None, "annotations": []},
        {"role": "developer", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]},
        {"role": "user", "content": "and?"}]}),
]


@pytest.fixture(scope="module")
def client(model_dirs):
    from fastapi.testclient import TestClient

    from hydraserve.gateway.app import Gateway, create_app

    cfg = default_local_cluster()
    cluster = LocalCluster(cfg)
    # max_queue=0: a request that passed validation gets 429 at once instead of waiting for an
    # instance that this loop-less test server never starts (so a missed refusal fails fast)
    gateway = Gateway(GatewayConfig(max_queue=0), cfg, cluster, [])
    c = TestClient(create_app(gateway))  # no lifespan: no cluster process is started
    assert c.post("/admin/models", json={"name": "m", "path": model_dirs["llama"]}).status_code \
        == 200
    c.gateway = gateway
    yield c
    cluster.close()


@pytest.mark.parametrize("name,path,body,status,param,text", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_is_refused(client, name, path, body, status, param, text):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    err["message"].encode("utf-8")  # never echoes text it cannot encode
    if param is not None:
        assert err["param"] == param, err
    if text is not None:
        assert text in err["message"], err


def test_a_valid_request_passes_validation(client):
    r = client.post("/v1/completions", json=OK)
    assert r.status_code == 429  # it reached the queue (see the fixture)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 429


@pytest.mark.parametrize("name,path,body", VALID, ids=[c[0] for c in VALID])
def test_every_declared_parameter_is_accepted(client, name, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 429, r.text


def test_the_server_is_alive_and_nothing_was_queued(client):
    for name, path, body, *_ in CASES:
        client.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"})
    assert client.get("/health").json()["ok"]
    assert client.get("/v1/models").status_code == 200
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert not any(ep.queue for ep in client.gateway.controller.models().values())


# -- no 5xx: malformed bodies of every shape, to every endpoint that reads a body ---------------

def _nested(n: int):
    return [_nested(n - 1)] if n else "x"


MALFORMED = [
    b"", b"null", b"true", b'"a string"', b"12345", b"[]", b"{}", b"{", b"\x00\x01",
    b'{"model": "m", "prompt": "x",}',  # a trailing comma
    b'{"model": "m", "prompt": "x"} trailing',
    b'\xef\xbb\xbf{"model": "m", "prompt": "x", "max_tokens": 0}',  # a byte-order mark
    b'{"model": "\xff\xfe", "prompt": "x"}',  # not UTF-8
    b'{"model": "m", "prompt": "\xed\xa0\x80"}',  # a surrogate encoded as if it were UTF-8
    b'{"model": "m", "prompt": NaN}',
    b'{"model": "m", "prompt": "x", "max_tokens": Infinity}',
    b'{"model": "m", "prompt": "x", "temperature": -Infinity}',
    b'{"model": "m", "prompt": "x", "top_p": 1e999}',
    b'{"model": "m", "prompt": "x", "seed": 123456789012345678901234567890}',
    b'{"model": "m", "model": 5, "prompt": "x"}',  # a repeated key (the last wins)
    b'{"model": "m", "prompt": "\\ud83d\\ude00\\ud800"}',  # a pair, then a lone surrogate
    b'{"model": "m", "prompt": "x\\u0000", "max_tokens": 0}',
    deep(100),
    {"model": "m", "prompt": "x", "\u0000": 1},
    {"model": "m", "prompt": "x", "🙂": "🙂"},
    {"model": "m", "prompt": "x", "": 1},
    {"model": "m", "prompt": "x", "k" * 5000: 1},
    {"model": None, "prompt": None},
    {"model": "m", "prompt": [[[[1]]]]},
    {"model": "m", "prompt": [None]},
    {"model": "m", "prompt": {"text": "x"}},
    {"model": "m", "prompt": [1.5]},
    {"model": "m", "prompt": [-1]},
    {"model": "m", "prompt": _nested(60)},
    {"model": ["m"], "prompt": "x"},
    {"model": {"$ne": 1}, "prompt": "x"},
    {"model": "m" * 300, "prompt": "x"},
    {"model": "", "prompt": "x"},
    {"model": "m", "prompt": "x", "max_tokens": -10**30},
    {"model": "m", "prompt": "x", "logit_bias": [[1, 2]]},
    {"model": "m", "prompt": "x", "logit_bias": {"1": {"2": 3}}},
    {"model": "m", "prompt": "x", "stop": [["a"]]},
    {"model": "m", "prompt": "x", "stop": {"a": 1}},
    {"model": "m", "prompt": "x", "add_special_tokens": "yes"},
    {"model": "m", "prompt": "x", "messages": user("x")},
    {"model": "m", "messages": [[{"role": "user"}]]},
    {"model": "m", "messages": [{"role": {"x": 1}, "content": "x"}]},
    {"model": "m", "messages": user([[{"type": "text"}]])},
    {"model": "m", "messages": user({"type": "text", "text": "x"})},
    {"model": "m", "messages": user([{"type": None, "text": "x"}])},
    {"model": "m", "messages": user([{"type": ["text"], "text": "x"}])},
    {"model": "m", "messages": user([{"type": "text", "text": 5}])},
    {"model": "m", "messages": user([{"type": "text", "text": "x"}, 7])},
    {"model": "m", "messages": "hello"},
    {"model": "m", "messages": [None]},
    {"model": "m", "messages": [{}]},
    {"model": "m", "messages": user("x"), "stream_options": [True]},
    {"model": "m", "tokens": ["1"]},
    {"model": "m", "tokens": [1.0]},
    {"model": "m", "tokens": 5},
    {"model": "m", "tokens": [10**30]},
    {"model": "m", "tokens": [-1]},
]
# and every declared field of either body holding values of no field's type
_FIELDS = sorted(set(CompletionBody.model_fields) | set(ChatBody.model_fields))
_GARBAGE = [{"a": [1, {"b": None}]}, [[["x"]]], float("nan"), BAD, [None, {"": [[]]}], True]
MALFORMED += [raw({**(CHAT if f in ChatBody.model_fields and f not in CompletionBody.model_fields
                      else OK), f: g}) for f in _FIELDS for g in _GARBAGE]
BODY_PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]


def test_no_malformed_body_gets_a_5xx(client):
    assert len(MALFORMED) >= 40
    bad = []
    for body in MALFORMED:
        data = body if isinstance(body, bytes) else raw(body)
        for path in BODY_PATHS:
            try:
                r = client.post(path, content=data, headers={"Content-Type": "application/json"})
                err = r.json()["error"]
                ok = 400 <= r.status_code < 500 and set(err) == {
                    "message", "type", "param", "code"} and isinstance(err["message"], str)
            except Exception as e:  # noqa: BLE001 - a server error raised through the client
                ok, r = False, e
            if not ok:
                bad.append(f"{path} {data[:120]!r}: {getattr(r, 'status_code', r)} "
                           f"{getattr(r, 'text', '')[:200]}")
    assert not bad, f"{len(bad)} malformed bodies not refused cleanly:\n" + "\n".join(bad)
