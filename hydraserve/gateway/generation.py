"""The generation path of the OpenAI endpoints: a validated body becomes one control-plane
request per choice (each prompt of a batch, n times), whose events are merged into one
response, whole or streamed.

Choice ``index`` of prompt ``i`` and sample ``j`` is ``i * n + j``, as OpenAI numbers them.
Every choice of a request gets the same seed (the body's, or one drawn here when sampling) and
its own ``j``, so its token t is drawn from a generator seeded by (seed, j, t): it is the same
text whichever worker, batch or pipeline produces it, and after a failover.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from hydraserve.control.controller import Draining, QueueFull
from hydraserve.control.instance import Request
from hydraserve.gateway.detok import Detokenizer
from hydraserve.gateway.openai_api import ERROR_TYPES, error, sse, template_messages
from hydraserve.gateway.responses import LogprobFormat, Shaper, TokenLogprob

log = logging.getLogger("hydraserve.gateway")

MAX_SEQUENCES = 256  # choices of one request (prompts x n)
PLACED_WAIT_S = 1.0  # a stream's headers wait this long at most for its cold start's id
PROGRESS_S = 1.0  # a stream that waits for its first token gets a progress comment this often


class Refused(Exception):
    """The request is invalid: answered with an OpenAI error."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param

    def response(self) -> JSONResponse:
        return error(self.status, str(self), ERROR_TYPES.get(self.status, "server_error"),
                     self.param)


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    req: Request
    detok: Detokenizer
    echo: str = ""  # the prompt's text, when echoed
    text: str = ""
    finish: str = "length"
    tokens: int = 0
    entries: list[TokenLogprob] = field(default_factory=list)
    prompt_entries: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Step:
    """One event of one choice: its text delta, its finish reason (on the last), the logprob
    entries of its token, or an error."""

    text: str = ""
    finish: str | None = None
    entries: list[TokenLogprob] = field(default_factory=list)
    error: dict | None = None


def _prompts(gateway, body, chat: bool, tok) -> tuple[list[list[int]], list[str]]:
    """The token ids of each prompt and the text an echo repeats."""
    if chat:
        if not tok.has_chat_template:
            raise Refused(400, f"the model {body.model!r} has no chat template; send the prompt "
                          "to /v1/completions instead", "messages")
        try:
            text = tok.apply_chat_template(template_messages(body.messages))
        except Exception as e:  # noqa: BLE001 - a template error is the caller's input
            raise Refused(400, f"chat template failed: {e}", "messages") from None
        return [tok.encode(text, add_special_tokens=False)], [text]
    ids, texts = [], []
    for p in body.prompts():
        if isinstance(p, str):
            ids.append(tok.encode(p))
            texts.append(p)
            continue
        if any(t < 0 or t >= tok.vocab_size for t in p):
            raise Refused(400, "prompt token ids are outside the vocabulary", "prompt")
        ids.append(list(p))
        texts.append(tok.decode(list(p), skip_special_tokens=False))
    return ids, texts


def _max_tokens(gateway, body, chat: bool, prompt: list[int]) -> int:
    gw = gateway.gw
    room = gw.max_model_len - len(prompt)
    where = "messages" if chat else "prompt"
    if not prompt:
        raise Refused(400, "the prompt is empty", where)
    if room < 1:
        raise Refused(400, f"the prompt has {len(prompt)} tokens; this model's context is "
                      f"{gw.max_model_len}", where)
    asked = body.asked_max_tokens()
    if asked is not None and asked > room:  # refused, as vLLM and OpenAI do; never cut
        raise Refused(400, f"this model's maximum context length is {gw.max_model_len} tokens; "
                      f"the prompt has {len(prompt)} and max_tokens asks for {asked} more "
                      f"({len(prompt) + asked})", "max_tokens")
    if asked is not None and asked > gw.max_new_tokens:
        raise Refused(400, f"max_tokens is {asked}; this server generates at most "
                      f"{gw.max_new_tokens} tokens per request", "max_tokens")
    max_tokens = min(asked or (gw.max_new_tokens if chat else 16), room, gw.max_new_tokens)
    if body.min_tokens > max_tokens:
        raise Refused(400, f"min_tokens ({body.min_tokens}) is more than max_tokens "
                      f"({max_tokens})", "min_tokens")
    kv_tokens = gateway.controller.model(body.model).kv_tokens
    if gw.engine == "hydraserve" and len(prompt) + max_tokens > kv_tokens:
        # a worker could never hold this sequence: refuse it here instead of failing the
        # instance that would take it
        raise Refused(400, f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) "
                      f"need {len(prompt) + max_tokens} tokens of KV cache; a worker of "
                      f"{body.model} holds {kv_tokens} (raise `serve --kv-cache-mb`)",
                      "max_tokens")
    return max_tokens


def _logprobs(body, chat: bool) -> int | None:
    """How many top logprobs each token reports (None: no logprobs)."""
    if chat:
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def sampling(body, chat: bool, vocab: int) -> dict:
    """The worker params every choice of ``body`` shares (defaults left out)."""
    for tid in (body.stop_token_ids or ()):
        if tid >= vocab:
            raise Refused(400, f"stop_token_ids: {tid} is outside the vocabulary ({vocab})",
                          "stop_token_ids")
    bias = {}
    for tid, value in body.logit_bias_ids().items():
        if tid >= vocab:
            raise Refused(400, f"logit_bias: token id {tid} is outside the vocabulary ({vocab})",
                          "logit_bias")
        bias[str(tid)] = float(value)
    params = {"temperature": body.temperature, "top_p": body.top_p, "ignore_eos": body.ignore_eos}
    seed = body.seed
    if seed is None and body.temperature > 0:
        seed = secrets.randbits(62)  # one for all the choices: choice j differs by j
    optional = {"seed": seed, "top_k": body.top_k if body.top_k > 0 else None,
                "min_tokens": body.min_tokens or None,
                "presence_penalty": body.presence_penalty or None,
                "frequency_penalty": body.frequency_penalty or None,
                "repetition_penalty": None if body.repetition_penalty == 1 else
                body.repetition_penalty,
                "logit_bias": bias or None, "stop_token_ids": body.stop_token_ids or None,
                "logprobs": _logprobs(body, chat)}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def _submit(gateway, body, chat: bool, tok) -> tuple[str, list[Choice], int]:
    """Validate, then queue one request per choice: the response's id, the choices and the
    prompts' token count."""
    prompts, texts = _prompts(gateway, body, chat, tok)
    if len(prompts) * body.n > MAX_SEQUENCES:
        raise Refused(400, f"{len(prompts)} prompt(s) x n = {body.n} asks for "
                      f"{len(prompts) * body.n} choices; at most {MAX_SEQUENCES}", "n")
    limits = [_max_tokens(gateway, body, chat, p) for p in prompts]
    params = sampling(body, chat, tok.vocab_size)
    echo = not chat and body.echo
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    choices: list[Choice] = []
    try:
        for i, (prompt, limit) in enumerate(zip(prompts, limits)):
            for j in range(body.n):
                index = i * body.n + j
                p = {**params, "max_tokens": limit}
                if j:
                    p["choice"] = j
                if echo and body.logprobs is not None:
                    p["prompt_logprobs"] = body.logprobs
                req = Request(rid if len(prompts) * body.n == 1 else f"{rid}-{index}",
                              body.model, prompt, p)
                gateway.controller.submit(req)
                detok = Detokenizer(tok, body.stop_list(), body.min_tokens)
                choices.append(Choice(index, prompt, req, detok, echo=texts[i] if echo else ""))
    except QueueFull as e:
        _cancel(gateway, choices)
        gw = gateway.gw
        raise Refused(429, f"too many requests queued: {e}; retry after {gw.retry_after_s} s")
    except Draining as e:
        _cancel(gateway, choices)
        raise Refused(503, str(e)) from None
    return rid, choices, sum(len(p) for p in prompts)


def _cancel(gateway, choices: list[Choice]) -> None:
    for c in choices:
        gateway.controller.cancel(c.req)


async def generate(gateway, body, chat: bool):
    """Answer one OpenAI completion or chat request: a JSON response or an SSE stream."""
    tok = gateway.tokenizers.get(body.model)
    if tok is None or gateway.controller.model(body.model) is None:
        return Refused(404, f"the model {body.model!r} does not exist", "model").response()
    try:
        rid, choices, prompt_tokens = _submit(gateway, body, chat, tok)
    except Refused as e:
        resp = e.response()
        if e.status == 429:
            resp.headers["Retry-After"] = str(gateway.gw.retry_after_s)
        return resp
    shaper = Shaper(chat, rid, body.model)
    fmt = LogprobFormat(tok, chat, body.return_tokens_as_token_ids)
    want_logprobs = _logprobs(body, chat) is not None
    merged = _merged(choices, gateway, body.model)
    view = gateway.controller.view
    if body.stream:
        # the headers go out now: wait (briefly) for the control plane to place the requests,
        # so that they can name the cold start the answer waits for
        await asyncio.gather(*(view.placed(c.req, PLACED_WAIT_S) for c in choices))
        return StreamingResponse(
            _stream(_heartbeats(merged, gateway.gw.sse_heartbeat_s), choices, shaper, fmt,
                    want_logprobs, prompt_tokens, body.include_usage(), gateway),
            media_type="text/event-stream", headers=_headers(rid, choices))
    try:
        async for c, st in merged:
            if st.error:
                _cancel(gateway, choices)
                status = st.error.get("status", 500)
                return error(status if status in ERROR_TYPES else 500, st.error["error"],
                             ERROR_TYPES.get(status, "server_error"))
            c.text += st.text
            c.entries += st.entries
            c.finish = st.finish or c.finish
    except asyncio.CancelledError:  # the client went away
        _cancel(gateway, choices)
        raise
    out = []
    for c in choices:
        lp = None
        if want_logprobs:
            lp, _ = fmt.shape(c.prompt_entries + c.entries)
        out.append(shaper.choice(c.index, c.echo + c.text, c.finish, lp))
    return JSONResponse(shaper.whole(out, prompt_tokens, sum(c.tokens for c in choices)),
                        headers=_headers(rid, choices))


def _headers(rid: str, choices: list[Choice]) -> dict[str, str]:
    """X-Request-Id, and X-HydraServe-Cold-Start: the cold start (instance id) each choice
    waited for, "none" for one served by an instance that was ready, "queued" for one still
    waiting for room in the cluster; one entry per distinct value (look an id up in
    /admin/coldstarts or on /dashboard)."""
    seen: dict[str, None] = {}
    for c in choices:
        seen[c.req.cold_start or ("none" if c.req.instance else "queued")] = None
    return {"X-Request-Id": rid, "X-HydraServe-Cold-Start": ",".join(seen)}


async def _steps(c: Choice, gateway, model: str) -> AsyncIterator[Step]:
    """The steps of one choice, from its request's worker events; stops at the end."""
    metrics, last = gateway.metrics, None
    while True:
        item = await c.req.events.get()
        if "error" in item:
            metrics.requests.labels(model, "error").inc()
            yield Step(error=item)
            return
        if item.get("prompt_logprobs") is not None:
            c.prompt_entries = [TokenLogprob(t, e[0] if e else None, e[1] if e else [])
                                for t, e in zip(c.prompt_ids, item["prompt_logprobs"])]
        if item.get("token_id") is None:  # an engine may end a stream without a token
            metrics.requests.labels(model, "ok").inc()
            yield Step(c.detok.flush(), item.get("finish_reason") or "stop")
            return
        now = time.monotonic()
        if c.tokens == 0:
            metrics.ttft.labels(model).observe(now - c.req.arrival)
        elif last is not None:
            metrics.tpot.labels(model).observe(now - last)
        last = now
        c.tokens += 1
        entries = []
        if item.get("logprob") is not None:
            entries.append(TokenLogprob(item["token_id"], item["logprob"],
                                        item.get("top_logprobs") or []))
        delta = c.detok.push(item["token_id"])
        reason = item.get("finish_reason")
        if c.detok.stopped:
            gateway.controller.cancel(c.req, by_client=False)
            reason = "stop"
        elif reason:
            delta += c.detok.flush()
        if reason:
            metrics.requests.labels(model, "ok").inc()
        yield Step(delta, reason, entries)
        if reason:
            return


async def _merged(choices: list[Choice], gateway, model: str) -> AsyncIterator:
    """(choice, step) of every choice as they come; the choices run concurrently."""
    if len(choices) == 1:
        async for st in _steps(choices[0], gateway, model):
            yield choices[0], st
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(c: Choice) -> None:
        try:
            async for st in _steps(c, gateway, model):
                await queue.put((c, st))
        finally:
            await queue.put((c, done))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        left = len(tasks)
        while left:
            c, st = await queue.get()
            if st is done:
                left -= 1
                continue
            yield c, st
    finally:
        for t in tasks:
            t.cancel()


HEARTBEAT = object()  # what _heartbeats yields when nothing came for a while


async def _heartbeats(events: AsyncIterator, every_s: float) -> AsyncIterator:
    """``events``, with HEARTBEAT in between whenever none came for ``every_s`` seconds (a cold
    start can take longer than a proxy's idle timeout), and every `PROGRESS_S` at most until
    the first one came (the comment then tells the cold start's progress). The pending read is
    never cancelled by a heartbeat, only when the stream ends early."""
    if every_s <= 0:
        async for item in events:
            yield item
        return
    pending, first = None, True
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=min(every_s, PROGRESS_S)
                                         if first else every_s)
            if not done:
                yield HEARTBEAT
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            first = False
            yield item
    finally:
        if pending is not None:
            pending.cancel()


async def _stream(events, choices: list[Choice], shaper: Shaper, fmt: LogprobFormat,
                  want_logprobs: bool, prompt_tokens: int, include_usage: bool,
                  gateway) -> AsyncIterator[bytes]:
    started: set[int] = set()
    offsets = {c.index: 0 for c in choices}
    finished, done = 0, False
    try:
        async for item in events:
            if item is HEARTBEAT:
                # an SSE comment: clients ignore it, proxies see traffic, a person reads it
                line = None
                if not started:
                    line = await gateway.controller.view.progress(choices[0].req)
                yield f": {line or 'heartbeat'}\n\n".encode()
                continue
            c, st = item
            if st.error:
                done = True  # ended by the server: not a cancellation
                _cancel(gateway, choices)
                yield sse({"error": {"message": st.error["error"], "type": "server_error",
                                     "code": st.error.get("status", 500)}})
                return
            if c.index not in started:
                started.add(c.index)
                if shaper.chat:
                    yield sse(shaper.chunk(c.index, "", None, first=True))
                elif c.echo:
                    lp = None
                    if want_logprobs:
                        lp, offsets[c.index] = fmt.shape(c.prompt_entries)
                    yield sse(shaper.chunk(c.index, c.echo, None, logprobs=lp))
            lp = None
            if want_logprobs and st.entries:
                lp, offsets[c.index] = fmt.shape(st.entries, offsets[c.index])
            if st.text or st.finish or lp:
                yield sse(shaper.chunk(c.index, st.text, st.finish, logprobs=lp))
            finished += st.finish is not None
        done = finished == len(choices)
        if include_usage:
            yield sse(shaper.usage_chunk(prompt_tokens, sum(c.tokens for c in choices)))
        yield sse("[DONE]")
    finally:
        if not done:
            _cancel(gateway, choices)
