"""The gateway's routes beside completions: the model list, vLLM's /tokenize and /detokenize
(the model's own tokenizer and chat template, as the completion paths use them) and /version.

  GET  /v1/models    POST /tokenize    POST /detokenize    GET /version
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator

from hydraserve import __version__
from hydraserve.gateway.openai_api import (ERROR_TYPES, ChatMessage, StrictModel, edge,
                                           error, refusal, template_messages)

if TYPE_CHECKING:
    from hydraserve.gateway.app import Gateway
    from hydraserve.tokenizer import Tokenizer


class _ModelBody(StrictModel):
    model: str | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _edge(cls, data: Any) -> Any:
        return edge(data)


class TokenizeBody(_ModelBody):
    """A text (``prompt``) or a conversation (``messages``, through the chat template)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool | None = None  # messages only; default True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> "TokenizeBody":
        if (self.prompt is None) == (self.messages is None):
            raise refusal("send either a prompt or messages", "prompt")
        if self.prompt is not None and self.add_generation_prompt is not None:
            raise refusal("add_generation_prompt applies to messages only",
                          "add_generation_prompt")
        return self


class DetokenizeBody(_ModelBody):
    tokens: list[int]


def _fail(status: int, message: str, param: str | None = None) -> JSONResponse:
    return error(status, message, ERROR_TYPES.get(status, "server_error"), param)


def add_extra_routes(app: FastAPI, gateway: "Gateway") -> None:
    def tokenizer(name: str | None) -> "Tokenizer | JSONResponse":
        models = gateway.controller.models()
        if name is None:
            if len(models) != 1:
                return _fail(400, f"name the model: this server serves {len(models)}", "model")
            name = next(iter(models))
        tok = gateway.tokenizers.get(name)
        if tok is None or name not in models:
            return _fail(404, f"the model {name!r} does not exist", "model")
        return tok

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": gateway.created.get(name, 0),
             "owned_by": ep.entry.owned_by, "max_model_len": gateway.gw.max_model_len,
             "root": name, "parent": None}
            for name, ep in gateway.controller.models().items()]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        tok = tokenizer(body.model)
        if isinstance(tok, JSONResponse):
            return tok
        if body.messages is None:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = tok.encode(body.prompt, add_special_tokens=special)
        else:
            if not tok.has_chat_template:
                return _fail(400, "the model has no chat template; send a prompt", "messages")
            try:
                text = tok.apply_chat_template(template_messages(body.messages),
                                               add_generation_prompt=body.add_generation_prompt
                                               is not False)
            except Exception as e:  # noqa: BLE001 - a template error is the caller's input
                return _fail(400, f"chat template failed: {e}", "messages")
            ids = tok.encode(text, add_special_tokens=bool(body.add_special_tokens))
        out: dict = {"count": len(ids), "max_model_len": gateway.gw.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [tok.backend.id_to_token(i) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        tok = tokenizer(body.model)
        if isinstance(tok, JSONResponse):
            return tok
        if any(t < 0 or t >= tok.vocab_size for t in body.tokens):
            return _fail(400, f"token ids must be in [0, {tok.vocab_size})", "tokens")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}
