"""``hydraserve worker --engine vllm``: the genuine vLLM OpenAI server as a serverless worker.

The baseline the paper calls Serverless vLLM, with the real vLLM instead of our engine. The
worker speaks the same control API as ours (so the gateway, the controller and the experiment
scripts treat it like any p = 1 worker) and starts the way a stock vLLM container does:

1. attach to the node's storage agent (the same storage path as every worker: the whole-model
   image over the node's NIC limit) and write the bytes to a model folder on the node's disk as
   they arrive, with the side files (config, tokenizer) from the remote store -> ``weights_ready``;
2. start ``python -m vllm.entrypoints.openai.api_server --model DIR`` (imports, engine init,
   weight load, profiling and warm-up are all vLLM's own) -> ``vllm_started``;
3. poll its /health -> ``engine_ready``. ``/generate`` waits for that, then streams the request
   through vLLM's /v1/completions (prompt token ids in, ``return_token_ids`` out).

The sampling params map onto vLLM's. Exact: logit_bias, min_tokens (less the tokens a resumed
stream already has), repetition_penalty (vLLM counts prompt and output, so a resumed stream's
earlier tokens, now prompt, still count), and logprobs (vLLM's default raw_logprobs mode: before
temperature, penalties and bias). Not exact: presence/frequency penalties of a resumed stream
count only the tokens produced after the resume (vLLM sees the earlier ones as prompt); seeded
sampling draws from vLLM's own generator (one per request, seeded with ``choice_seed``), so
seeded text differs from our engine's and a resumed stream does not continue the same draws.
vLLM refuses prompt_logprobs on a stream, so they come by ``echo`` at one count for both kinds
(the larger), cut to each's; ties among top logprobs keep vLLM's order.

The image *is* a safetensors file (header + tensors under their checkpoint names), so the folder
is an ordinary Hugging Face model folder. vLLM runs in the Python given by ``--vllm-python``
(or HYDRASERVE_VLLM_PYTHON, which the command line reads), so it can live in its own virtual
environment.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hydraserve import lease
from hydraserve.httpjson import CallError, call, get_bytes
from hydraserve.store.image import SIDE_FILES, ImageKind, ImageSpec
from hydraserve.store.progressive import ProgressiveRegion
from hydraserve.protocol import Phase, WorkerHealth, WorkerSpec
from hydraserve.worker.timeline import Timeline

log = logging.getLogger("hydraserve.worker")

# where the README's set-up puts a separate vLLM environment
DEFAULT_VLLM_VENV_PYTHON = "/opt/vllm-venv/bin/python"
WRITE_CHUNK = 4 << 20
NO_VLLM = ("no Python with vLLM found (give --vllm-python or HYDRASERVE_VLLM_PYTHON; the README "
           "shows how to install the vLLM peer)")
LOAD_LINE = re.compile(r"Loading weights took ([0-9.]+) seconds")


def has_vllm(python: str) -> bool:
    try:
        r = subprocess.run([python, "-c", "import importlib.util as u, sys; "
                            "sys.exit(u.find_spec('vllm') is None)"], capture_output=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def find_vllm_python(given: str | None = None) -> str | None:
    """A Python interpreter that can import vllm: ``given`` (the command line passes
    --vllm-python, else HYDRASERVE_VLLM_PYTHON), else this one, else the README's separate
    environment; None if there is none."""
    if given:
        return given if has_vllm(given) else None
    for py in (sys.executable, DEFAULT_VLLM_VENV_PYTHON):
        if Path(py).exists() and has_vllm(py):
            return py
    return None


class VLLMWorker:
    """One stock vLLM server behind our worker control API."""

    def __init__(self, args: argparse.Namespace, timeline: Timeline):
        self.args, self.timeline = args, timeline
        self.wid = args.worker_id or f"{args.model}-r0"
        self.state = Phase.LOADING
        self.error: str | None = None
        self.ready = threading.Event()  # set when vLLM serves, or when the start failed
        self.proc: subprocess.Popen | None = None
        self.vllm_url: str | None = None
        self.vllm_load_s: float | None = None
        self.started_as: WorkerSpec | None = None  # reported in /health
        self.dir = Path(tempfile.mkdtemp(prefix=f"hydraserve-vllm-{self.wid}-"))
        self.exit_requested = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()

    def health(self) -> WorkerHealth:
        return WorkerHealth(self.state, self.wid, self.error, 0, True, self.timeline.as_dict(),
                            spec=self.started_as, extra={"model": self.args.model, "engine": "vllm", "rank": 0, "p": 1,
                                   "pid": os.getpid(), "vllm_url": self.vllm_url,
                                   "vllm_pid": self.proc.pid if self.proc else None,
                                   "vllm_load_s": self.vllm_load_s})

    # -- start ------------------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._start, name="vllm-start", daemon=True).start()

    def _start(self) -> None:
        try:
            self._fetch()
            self._launch()
            self._wait_healthy()
            self.state = Phase.READY
            self.timeline.mark("engine_ready")
        except Exception as e:  # noqa: BLE001 - reported through /health and to callers
            if not self._stopped:
                log.error("worker %s: vLLM start failed: %s", self.wid, e)
                self.state, self.error = Phase.FAILED, f"vLLM start failed: {e}"
        finally:
            self.ready.set()
            self.timeline.notify()

    def _fetch(self) -> None:
        """The node-local download: the full image to DIR/model.safetensors, as bytes arrive."""
        token = self.args.cluster_token  # the agent's and the store's
        region = ProgressiveRegion.attach(self.args.agent, ImageSpec(self.args.model,
                                                                     ImageKind.FULL), token=token)
        self.timeline.mark("attached")
        try:
            with open(self.dir / "model.safetensors", "wb") as f:
                off = 0
                while off < region.length and not self._stopped:
                    end = min(region.length, off + WRITE_CHUNK)
                    region.wait_for(end)
                    f.write(region.data[off:end])
                    off = end
        finally:
            region.close()
        remote = call(self.args.agent, "GET", "/health", token=token)["remote"]
        for name in SIDE_FILES:
            try:
                body = get_bytes(remote, f"/models/{self.args.model}/files/{name}",
                                 token=token)
            except CallError as e:
                if e.status == 404:
                    continue
                raise
            (self.dir / name).write_bytes(body)
        if not (self.dir / "config.json").exists():
            raise RuntimeError(f"the store has no config.json for {self.args.model}")
        self.timeline.mark("weights_ready")

    def _launch(self) -> None:
        with socket.socket() as s:  # a free port for vLLM (it binds it a moment later)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [self.args.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.dir), "--served-model-name", self.args.model,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", self.args.dtype,
               "--max-model-len", str(self.args.max_model_len), "--seed", "0",
               *shlex.split(self.args.vllm_args)]
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.args.kv_cache_gb))))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        log.info("worker %s: starting vLLM: %s", self.wid, shlex.join(cmd))
        # its own session: stopping the worker stops vLLM's engine-core and worker processes too
        with self._lock:  # a stop racing this start must see the process, or prevent it
            if self._stopped:
                raise RuntimeError("the worker is stopping")
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True, text=True, bufsize=1)
        self.vllm_url = f"http://127.0.0.1:{port}"
        self.timeline.mark("vllm_started")
        threading.Thread(target=self._pump_log, name="vllm-log", daemon=True).start()

    def _pump_log(self) -> None:
        """vLLM's output into this worker's log (stderr); picks out its weight-load time."""
        for line in self.proc.stdout:
            sys.stderr.write("[vllm] " + line)
            m = LOAD_LINE.search(line)
            if m:
                self.vllm_load_s = float(m.group(1))
        sys.stderr.flush()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.args.vllm_start_timeout
        while time.monotonic() < deadline and not self._stopped:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with status {self.proc.returncode} "
                                   "(its output is in this worker's log)")
            try:
                get_bytes(self.vllm_url, "/health", timeout=2)
                return
            except (CallError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"vLLM did not serve within {self.args.vllm_start_timeout:.0f} s")

    # -- stop -------------------------------------------------------------------------------
    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            proc = self.proc
        self.state = Phase.STOPPED
        self.timeline.notify()
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group we created for it
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        self.exit_requested.set()
        self.ready.set()


def choice_seed(seed: int, choice: int) -> int:
    """vLLM's seed for choice ``choice`` of a request seeded ``seed``: the seed itself for choice
    0, else a hash of both in [0, 2**63) (vLLM takes a signed 64-bit seed)."""
    if not choice:
        return seed
    digest = hashlib.blake2b(f"{seed}/{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _count(body: dict, name: str) -> int | None:
    if body.get(name) is None:
        return None
    if int(body[name]) < 0:
        raise ValueError(f"{name} must be >= 0")
    return int(body[name])


def wanted_logprobs(body: dict) -> tuple[int | None, int | None]:
    """The (logprobs, prompt_logprobs) counts our /generate body asks for; a resumed stream's
    prompt logprobs went out with its first token already."""
    return _count(body, "logprobs"), None if body.get("output_ids") else \
        _count(body, "prompt_logprobs")


def completion_body(model: str, body: dict) -> dict:
    """Our /generate body -> vLLM's /v1/completions body (token ids in and out)."""
    # a resumed stream (see worker/api.py): its tokens so far extend the prompt
    done = [int(t) for t in body.get("output_ids") or ()]
    out = {"model": model, "prompt": [int(t) for t in body["prompt_ids"]] + done, "stream": True,
           "return_token_ids": True,
           "max_tokens": int(body.get("max_tokens") or 16) - len(done),
           "temperature": float(body.get("temperature") or 0.0)}
    for k in ("top_p", "top_k", "seed", "ignore_eos", "presence_penalty", "frequency_penalty",
              "repetition_penalty"):
        if body.get(k) is not None:
            out[k] = body[k]
    if out.get("top_k") == 0:
        out["top_k"] = -1  # vLLM's "disabled"
    if out.get("seed") is not None:
        out["seed"] = choice_seed(int(out["seed"]), int(body.get("choice") or 0))
    if body.get("stop_token_ids"):
        out["stop_token_ids"] = [int(t) for t in body["stop_token_ids"]]
    if body.get("min_tokens"):
        out["min_tokens"] = max(0, int(body["min_tokens"]) - len(done))
    if body.get("logit_bias"):
        out["logit_bias"] = {str(int(t)): float(b) for t, b in dict(body["logit_bias"]).items()}
    k, pk = wanted_logprobs(body)
    if k is not None or pk is not None:  # one count for both: token_items cuts each to its own
        out["logprobs"] = max(x for x in (k, pk) if x is not None)
        out["return_tokens_as_token_ids"] = True  # top_logprobs keys "token_id:N"
    if pk is not None:
        # vLLM refuses prompt_logprobs on a stream, but echo gives the prompt's logprobs (at
        # the same count as logprobs) ahead of the first token's, in the first chunk
        out["echo"] = True
    return out


def _top(top: dict | None, k: int) -> list[list]:
    """vLLM's {"token_id:N": logprob} (the top k, plus the chosen token if not among them) ->
    our [[N, logprob], ...]: the k highest, highest first."""
    pairs = [[int(t.rsplit(":", 1)[1]), float(lp)] for t, lp in (top or {}).items()]
    return sorted(pairs, key=lambda p: -p[1])[:k]


def token_items(chunk: dict, body: dict | None = None) -> list[dict]:
    """One SSE chunk of vLLM's completion stream for our /generate ``body`` -> our
    {"token_id", "finish_reason"} items, with "logprob" and "top_logprobs" if the body asks for
    logprobs and "prompt_logprobs" on the first if it asks for those (a finish without a token
    becomes {"token_id": None, "finish_reason"})."""
    if "error" in chunk:
        err = chunk["error"]
        if not isinstance(err, dict):
            return [{"error": str(err)}]
        item = {"error": err.get("message", str(err))}
        if err.get("code") == 400:  # vLLM refused the request (a stream's 200 was sent)
            item["status"] = 400
        return [item]
    k, pk = wanted_logprobs(body or {})
    items = []
    for choice in chunk.get("choices") or ():
        ids = choice.get("token_ids") or []
        reason = choice.get("finish_reason")
        new = [{"token_id": int(t), "finish_reason": reason if i == len(ids) - 1 else None}
               for i, t in enumerate(ids)]
        if reason and not ids:
            new.append({"token_id": None, "finish_reason": reason})
        lps = choice.get("logprobs") or {}
        lp, tops = lps.get("token_logprobs") or [], lps.get("top_logprobs") or []
        head = len(lp) - len(ids)  # > 0 in the first chunk of an echo: the prompt's entries
        if k is not None and head >= 0:
            for i in range(len(ids)):
                new[i]["logprob"] = float(lp[head + i])
                new[i]["top_logprobs"] = _top(tops[head + i], k)
        if pk is not None and head > 0 and new:
            new[0]["prompt_logprobs"] = [None if lp[i] is None else
                                         [float(lp[i]), _top(tops[i], pk)] for i in range(head)]
        items += new
    return items


def make_app(worker: VLLMWorker):
    import aiohttp
    from aiohttp import web

    from hydraserve.store.server import json_error
    from hydraserve.worker.routes import add_control_routes, health_route

    app = web.Application()

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)

    async def init(_: web.Request) -> web.Response:
        return web.json_response(worker.health().to_json())  # p = 1: no ring to join

    async def generate(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            if not body.get("prompt_ids"):
                return json_error(400, "prompt_ids is empty")
            vbody = completion_body(worker.args.model, body)
        except (ValueError, KeyError, TypeError) as e:
            return json_error(400, f"invalid request: {e}")
        loop = asyncio.get_running_loop()
        if not worker.ready.is_set():
            await loop.run_in_executor(None, worker.ready.wait)
        if worker.state is not Phase.READY:
            return json_error(503, worker.error or f"worker is {worker.state.value}")
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            async with app["session"].post(worker.vllm_url + "/v1/completions",
                                           json=vbody) as vr:
                if vr.status != 200:
                    text = await vr.text()
                    try:
                        msg = json.loads(text).get("error", {}).get("message", text)
                    except (ValueError, AttributeError):
                        msg = text
                    item = {"error": f"vLLM {vr.status}: {msg}"}
                    if vr.status == 400:  # vLLM refused the request itself
                        item["status"] = 400
                    await resp.write(json.dumps(item).encode() + b"\n")
                    return resp
                async for line in vr.content:
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    for item in token_items(json.loads(data), body):
                        await resp.write(json.dumps(item).encode() + b"\n")
        except aiohttp.ClientError as e:
            await resp.write(json.dumps({"error": f"vLLM unreachable: {e}"}).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def consolidate(_: web.Request) -> web.Response:
        return json_error(409, "a vLLM worker serves the whole model: nothing to consolidate")

    async def stop(_: web.Request) -> web.Response:
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)
        return web.json_response({"stopped": worker.wid})

    add_control_routes(app, health=health_route(worker), init=init, generate=generate,
                       consolidate=consolidate, stop=stop)
    return app


def run(args: argparse.Namespace, start: float) -> int:
    if args.p != 1:
        log.error("the vllm engine serves whole models: --pipeline must be 1, not %d", args.p)
        return 2
    # the gateway passes the Python it found; probing it again would add a process to every
    # cold start (a wrong one fails vLLM's start, reported through /health)
    args.vllm_python = args.vllm_python or find_vllm_python()
    if args.vllm_python is None:
        log.error("%s", NO_VLLM)
        return 2
    wid = args.worker_id or f"{args.model}-r0"
    worker = VLLMWorker(args, Timeline(wid, start))
    from hydraserve.worker.commands import spec_from_args  # it imports this module lazily

    worker.started_as = spec_from_args(args)
    worker.start()

    from hydraserve.store.server import run_until

    app = make_app(worker)
    worker.timeline.mark("http_ready")
    try:
        run_until(app, args.host, args.port, f"hydraserve worker {wid} (vllm)",
                  worker.exit_requested, extra=" stage_port=0",
                  token=getattr(args, "cluster_token", None), cancel_on_disconnect=True,
                  lease=lease.from_args(args))
    finally:
        worker.stop()
    log.info("worker %s: exited", wid)
    return 0
