"""OpenAI wire format: request bodies (pydantic, only at this edge), errors, SSE (the response
objects are built in `responses`)."""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


_TOOLS = "tool calling is not implemented"
# why a top-level field that OpenAI (or vLLM) defines is refused; any other gets the generic reason
UNSUPPORTED = {"tools": _TOOLS, "tool_choice": _TOOLS, "functions": _TOOLS, "function_call": _TOOLS,
               "parallel_tool_calls": _TOOLS,
               "suffix": "insertion (text after the completion) is not implemented",
               "best_of": "use n (choices are not ranked on the server)"}
_TOKEN_ID = re.compile(r"[0-9]{1,10}")
MAX_PROMPTS = 64
MAX_LOGPROBS = 20


def printable(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters with lone surrogates escaped (safe in a JSON reply)."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def refusal(message: str, param: str | None = None) -> PydanticCustomError:
    """A validation error with our own message; ``param`` names the top-level field (else the
    error's location does)."""
    return PydanticCustomError("hydraserve", "{message}", {"message": message, "param": param})


def unsupported(name: str) -> str:
    reason = UNSUPPORTED.get(name, "it is not a parameter of this API")
    return f"the parameter '{printable(name)}' is not supported by this server: {reason}"


def _unencodable(value: Any) -> bool:
    """Whether ``value`` holds, anywhere (keys included), text that UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_unencodable(k) or _unencodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_unencodable(v) for v in value)
    return False


def edge(data: Any) -> Any:
    """A body's top level as the models read it: JSON nulls are absent, and a field holding a
    lone UTF-16 surrogate (JSON "\\ud800") anywhere in it is refused by name (a reply echoing it
    could not be encoded)."""
    if not isinstance(data, dict):
        return data
    for key, value in data.items():
        if _unencodable(key) or _unencodable(value):
            raise refusal(f"the field '{printable(key)}' holds text that is not valid Unicode (a "
                          "lone UTF-16 surrogate such as \\ud800)", printable(key))
    return {k: v for k, v in data.items() if v is not None}


class StrictModel(BaseModel):
    # strict: no coercion ("yes" is not a bool, 1.0 is not an int), as OpenAI's API refuses them
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False


class ResponseFormat(StrictModel):
    type: Literal["text"]


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _accept(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # a message copied from a response carries "refusal": null, "tool_calls": null, ...
        data = {k: v for k, v in data.items()
                if v is not None and not (k in ("refusal", "annotations") and v in ("", [], {}))}
        for key in ("tool_calls", "tool_call_id", "function_call"):
            if key in data:
                raise refusal(f"'{key}' in a message is not supported: {_TOOLS}", "messages")
        content = data.get("content")
        if isinstance(content, list):
            kinds = [p.get("type") if isinstance(p, dict) else None for p in content]
            for kind in kinds:
                if isinstance(kind, str) and kind != "text":
                    raise refusal(f"content part type '{printable(kind)}' is not supported: this "
                                  "server serves text-only models", "messages")
            if "text" not in kinds:
                raise refusal("the content list has no text part (this server serves text-only "
                              "models)", "messages")
        return data

    @model_validator(mode="after")
    def _content_needed(self) -> "ChatMessage":
        # OpenAI: only an assistant message (one carrying tool calls) may omit its content
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs a content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as a chat template reads them (a message's name only when it has one)."""
    return [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in messages]


class _Body(StrictModel):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, lt=2**31)  # -1 and 0: disabled
    n: int = Field(default=1, ge=1, le=32)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = \
        Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)  # vLLM's extension
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = \
        Field(default=None, max_length=1024)
    return_tokens_as_token_ids: bool = False  # vLLM's extension
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _edge(cls, data: Any) -> Any:
        return edge(data)

    @field_validator("response_format", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("type"), str) and v["type"] != "text":
            raise refusal(f"response_format type '{printable(v['type'])}' is not supported: "
                          "structured output is not supported by this server", "response_format")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or ():
            if not _TOKEN_ID.fullmatch(key):
                raise refusal(f"logit_bias keys are token ids (decimal integers), not "
                              f"'{printable(key, 32)}'", "logit_bias")
        return v

    @model_validator(mode="after")
    def _min_within_max(self):
        asked = self.asked_max_tokens()
        if asked is not None and self.min_tokens > asked:
            raise refusal(f"min_tokens ({self.min_tokens}) is more than max_tokens ({asked})",
                          "min_tokens")
        return self

    def asked_max_tokens(self) -> int | None:
        """max_completion_tokens (chat) or max_tokens, as sent."""
        return getattr(self, "max_completion_tokens", None) or self.max_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _prompt_shape(self) -> "CompletionBody":
        prompts = self.prompts()
        if not prompts or any(p == [] for p in prompts):
            raise refusal("the prompt is empty", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise refusal(f"{len(prompts)} prompts; at most {MAX_PROMPTS} in one request", "prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatBody":
        if self.top_logprobs is not None and not self.logprobs:
            raise refusal("top_logprobs needs logprobs: true", "top_logprobs")
        return self


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after"}  # union branches


def invalid_body(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of a 400 for a body's validation errors (FastAPI's, located under
    "body"): a refused top-level field if any, as the clearest; else of the first field's
    errors the deepest (of a union's branches, the one that got furthest)."""
    if not errors:
        return "invalid request", None
    top = lambda e: tuple(e.get("loc", ()))[:2]  # noqa: E731
    first = next((e for e in errors if e.get("type") == "extra_forbidden"
                  and len(e.get("loc", ())) == 2), None) or \
        max((e for e in errors if top(e) == top(errors[0])), key=lambda e: len(e.get("loc", ())))
    loc = [x for x in first.get("loc", ())[1:]
           if not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))]
    where = ".".join(printable(str(x)) for x in loc) or None
    param, kind, msg = (printable(str(loc[0])) if loc else None), first.get("type"), \
        first.get("msg", "invalid request")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if kind in ("model_attributes_type", "dict_type") and not loc:
        msg = "the request body must be a JSON object"
    elif kind == "extra_forbidden" and len(loc) == 1:
        return unsupported(str(loc[0])), param
    elif kind == "extra_forbidden":
        msg = f"unknown field '{printable(str(loc[-1]))}'"
    elif kind == "hydraserve":
        ctx = first.get("ctx") or {}
        msg, param = ctx.get("message", msg), ctx.get("param") or param
    return msg + (f" ({where})" if where else ""), param


def error(status: int, message: str, type_: str = "invalid_request_error",
          param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable", 500: "server_error"}


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
