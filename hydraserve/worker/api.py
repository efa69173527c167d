"""The worker's HTTP control API (aiohttp).

  GET  /health        state, stage, timeline
  GET  /stats         the same plus scheduler and KV use
  POST /init          {"peers": [{"rank", "host", "stage_port"}]}: join the ring
  POST /generate      head only: {"prompt_ids": [...], "max_tokens", "temperature", "top_p",
                      "top_k", "seed", "stop_token_ids", "ignore_eos", "output_ids"} ->
                      newline-delimited JSON, one {"token_id", "finish_reason"} per token, or
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
from hydraserve.store.server import json_error
from hydraserve.worker.core import HANDOVER, Worker
from hydraserve.worker.routes import add_control_routes

log = logging.getLogger("hydraserve.worker")

PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")



def sampling_params(body: dict) -> SamplingParams:
    """Build sampling parameters from a request body; ValueError if they are invalid."""
    kwargs = {k: body[k] for k in PARAM_FIELDS if body.get(k) is not None}
    if "stop_token_ids" in body:
        kwargs["stop_token_ids"] = tuple(int(t) for t in body["stop_token_ids"] or ())
    try:
        return SamplingParams(**kwargs)
    except TypeError as e:
        raise ValueError(str(e)) from None


def make_app(worker: Worker) -> web.Application:
    app = web.Application()

    async def health(_: web.Request) -> web.Response:
        return web.json_response(worker.describe())

    async def init(request: web.Request) -> web.Response:
        try:
            peers = (await request.json())["peers"]
        except (ValueError, KeyError, TypeError):
            return json_error(400, 'body must be {"peers": [{"rank", "host", "stage_port"}, ...]}')
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, worker.connect, peers)
        except (OSError, ConnectionError, KeyError) as e:
            return json_error(502, f"cannot join the pipeline: {e}")
        return web.json_response(worker.describe())

    async def generate(request: web.Request) -> web.StreamResponse:
        why = worker.can_generate()
        if why:
            return json_error(503, why)
        try:
            body = await request.json()
            prompt = [int(t) for t in body["prompt_ids"]]
            output_ids = [int(t) for t in body.get("output_ids") or ()]
            params = sampling_params(body)
        except (ValueError, KeyError, TypeError) as e:
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
                    item = {"error": HANDOVER, "handover": True}
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
        return web.json_response(worker.describe())

    async def stop(_: web.Request) -> web.Response:
        # hands the open streams over first (waits for the engine thread: not on this loop)
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)
        return web.json_response({"stopped": worker.cfg.worker_id})

    async def hand_over(_: web.Application) -> None:
        # SIGTERM (a planned stop, e.g. a preemption notice) shuts the server down: give the
        # open streams their handover items while their connections are still open
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app.on_shutdown.append(hand_over)

    add_control_routes(app, health=health, init=init, generate=generate,
                       consolidate=consolidate, stop=stop)
    return app
