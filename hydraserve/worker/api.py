"""The worker's HTTP control API (aiohttp).

  GET  /health        a protocol.WorkerHealth: phase, stage, timeline, engine load;
                      ?wait=EVENT[&timeout=S] answers once EVENT is on the timeline, the
                      worker failed or stopped, or S seconds (default 30, at most 300) passed
  GET  /stats         the same
  POST /init          {"peers": [protocol.Peer, ...]}: join the ring
  POST /generate      head only: a protocol.GenerateRequest: {"prompt_ids": [...], "output_ids",
                      and the sampling params} -> newline-delimited JSON, one protocol.TokenEvent
                      {"token_id", "finish_reason"} per token (with its logprobs if asked), or
                      one {"error"} (with "status": 400 when the request itself is at fault,
                      with "handover": true when the worker is stopping in order and the stream
                      should continue elsewhere); "output_ids" are tokens the request already
                      produced on a lost worker: generation continues after them. Closing the
                      connection aborts the request at the engine's next step
  POST /consolidate   all-card stages: fetch the rest of the model and take it over
  POST /stop          hand the open streams over (a handover item each), leave the ring,
                      release the regions, exit; SIGTERM does the same
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets

from aiohttp import web

from hydraserve.engine.sequence import SamplingParams
from hydraserve.protocol import HANDOVER, ErrorEvent, GenerateRequest, Peer, ProtocolError
from hydraserve.store.server import json_error
from hydraserve.worker.core import Worker
from hydraserve.worker.routes import add_control_routes, health_route

log = logging.getLogger("hydraserve.worker")

PARAM_FIELDS = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int,
                "seed": int, "ignore_eos": bool, "choice": int, "min_tokens": int,
                "presence_penalty": float, "frequency_penalty": float,
                "repetition_penalty": float, "logprobs": int, "prompt_logprobs": int}


def _typed(name: str, value, kind: type):
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ValueError(f"{name} must be {kind.__name__}, not {type(value).__name__}")
    return value


def sampling_params(params: dict) -> SamplingParams:
    """Build sampling parameters from a request's ``params``; ValueError if they are invalid."""
    kwargs = {k: _typed(k, params[k], kind) for k, kind in PARAM_FIELDS.items()
              if params.get(k) is not None}
    try:
        if params.get("stop_token_ids") is not None:
            kwargs["stop_token_ids"] = tuple(int(t) for t in params["stop_token_ids"])
        if params.get("logit_bias"):
            kwargs["logit_bias"] = tuple(sorted((int(t), float(b))
                                                for t, b in dict(params["logit_bias"]).items()))
        return SamplingParams(**kwargs)
    except TypeError as e:
        raise ValueError(str(e)) from None


def make_app(worker: Worker) -> web.Application:
    app = web.Application()

    async def init(request: web.Request) -> web.Response:
        try:
            peers = [Peer.from_json(p) for p in (await request.json())["peers"]]
        except (ValueError, KeyError, TypeError):  # ProtocolError is a ValueError
            return json_error(400, 'body must be {"peers": [{"rank", "host", "stage_port"}, ...]}')
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, worker.connect, peers)
        except (OSError, ConnectionError, KeyError) as e:
            return json_error(502, f"cannot join the pipeline: {e}")
        return web.json_response(worker.health().to_json())

    async def generate(request: web.Request) -> web.StreamResponse:
        why = worker.can_generate()
        if why:
            return json_error(503, why)
        try:
            req = GenerateRequest.from_json(await request.json())
            prompt, output_ids = req.prompt_ids, req.output_ids
            params = sampling_params(req.params)
        except (ValueError, KeyError, TypeError, ProtocolError) as e:
            return json_error(400, f"invalid request: {e}")
        if not prompt:
            return json_error(400, "prompt_ids is empty")
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        key = secrets.token_hex(8)
        worker.submit(key, prompt, params,
                      lambda item: loop.call_soon_threadsafe(items.put_nowait, item), output_ids)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(items.get(), 1.0)
                except asyncio.TimeoutError:
                    if not worker.stopping.is_set():
                        continue
                    # stopped before the engine took the request: hand it over unanswered
                    item = ErrorEvent(HANDOVER, handover=True).to_json()
                await resp.write(json.dumps(item).encode() + b"\n")
                if "error" in item or item.get("finish_reason"):
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            # the server runs with handler cancellation: a client that closes its connection
            # cancels this handler at once, so the abort reaches the engine's next step
            worker.abort(key)
            raise
        await resp.write_eof()
        return resp

    async def consolidate(_: web.Request) -> web.Response:
        try:
            worker.consolidate()
        except ValueError as e:
            return json_error(409, str(e))
        return web.json_response(worker.health().to_json())

    async def stop(_: web.Request) -> web.Response:
        # hands the open streams over first (waits for the engine thread: not on this loop)
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)
        return web.json_response({"stopped": worker.cfg.worker_id})

    async def hand_over(_: web.Application) -> None:
        # SIGTERM (a planned stop, e.g. a preemption notice) shuts the server down: give the
        # open streams their handover items while their connections are still open
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app.on_shutdown.append(hand_over)

    add_control_routes(app, health=health_route(worker), init=init, generate=generate,
                       consolidate=consolidate, stop=stop)
    return app
