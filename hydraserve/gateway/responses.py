"""OpenAI response objects: completions and chat completions, whole or as stream chunks, with
any number of choices and their logprobs in OpenAI's two shapes.

The workers report logprobs as token ids (``[token_id, logprob]`` pairs); here they become the
shape of each endpoint: /v1/completions' parallel lists (tokens, token_logprobs, top_logprobs as
{token: logprob}, text_offset) and /v1/chat/completions' list of {token, logprob, bytes,
top_logprobs}. A token is named by its text, or "bytes:\\xe2\\x80" for part of a character, or
"token_id:N" with vLLM's ``return_tokens_as_token_ids``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from hydraserve.tokenizer import Tokenizer


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


@dataclass
class TokenLogprob:
    """One token's logprob entry, as a worker reported it (``logprob`` None: a prompt's first
    token, which has none)."""

    token_id: int
    logprob: float | None
    top: list = field(default_factory=list)  # [[token_id, logprob], ...]


class LogprobFormat:
    """Names tokens and builds each endpoint's logprobs objects for one request."""

    def __init__(self, tok: Tokenizer, chat: bool, as_ids: bool = False):
        self.tok, self.chat, self.as_ids = tok, chat, as_ids

    def name(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tok.token_text(token_id)

    def chat_entries(self, entries: list[TokenLogprob]) -> list[dict]:
        def one(tid: int, lp: float) -> dict:
            return {"token": self.name(tid), "logprob": lp,
                    "bytes": list(self.tok.token_bytes(tid))}
        return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                for e in entries]

    def completion(self, entries: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """The completions logprobs object of ``entries``, whose text starts at character
        ``offset`` of the choice's text; and the offset after them."""
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            name = self.name(e.token_id)
            tokens.append(name)
            lps.append(e.logprob)
            offsets.append(offset)
            offset += len(self.tok.token_text(e.token_id))
            if e.logprob is None:
                tops.append(None)
                continue
            top = {self.name(t): lp for t, lp in e.top}
            top.setdefault(name, e.logprob)  # the sampled token is always there (as OpenAI)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}, offset

    def shape(self, entries: list[TokenLogprob], offset: int = 0) -> tuple[dict, int]:
        """This endpoint's logprobs object of ``entries`` and the text offset after them."""
        if self.chat:
            return {"content": self.chat_entries(entries), "refusal": None}, offset
        return self.completion(entries, offset)


class Shaper:
    """Builds the response objects of one request, chat or completion."""

    def __init__(self, chat: bool, rid: str, model: str):
        self.chat, self.id, self.model = chat, rid, model
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, index: int, text: str, finish: str | None, first: bool = False,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            delta: dict = {"content": text} if text or not first else {}
            if first:
                delta = {"role": "assistant", "content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt: int, completion: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage(prompt, completion)}

    def choice(self, index: int, text: str, finish: str, logprobs: dict | None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def whole(self, choices: list[dict], prompt: int, completion: int) -> dict:
        return {**self._base(self.object), "choices": choices, "usage": usage(prompt, completion)}
