"""Replay a trace against an OpenAI-compatible server, streaming, and record every request.

Each trace record is sent at its time (divided by ``speed``) as a streamed
``POST /v1/completions`` whose prompt is ``prompt_tokens`` token ids (seeded per request, so
every execution type sees the same prompts) and whose output is exactly ``max_tokens`` tokens
(``ignore_eos``, an extension that vLLM and HydraServe both take). At most ``concurrency``
requests are open at once; a request that waits for a slot is sent late and its lag recorded.

One result per trace record, written as soon as the request ends (JSONL, after a
``{"meta": ...}`` line), so an interrupted replay keeps what it measured; requests not sent by
then are written with ``error: "not sent"``. A result::

    {"index", "endpoint", "model", "application", "ttft_slo_s", "tpot_slo_ms",
     "prompt_tokens", "max_tokens", "scheduled", "sent", "sent_wall", "status", "error",
     "ttft_s", "tpot_ms", "output_tokens", "finish_reason", "chunk_times"}

``scheduled`` and ``sent`` are seconds since the replay started; ``ttft_s`` and
``chunk_times`` are seconds since ``sent``; ``sent_wall`` is the wall clock (the gateway's
lifecycle log uses it too). ``status`` is the HTTP status (None when no answer came);
``error`` is None for a request that streamed to its end.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import aiohttp

from hydraserve.workload.make import TraceRecord

log = logging.getLogger("hydraserve.replay")


@dataclass(frozen=True)
class ReplayConfig:
    url: str  # the server, e.g. http://127.0.0.1:8000
    concurrency: int = 512  # requests open at once
    timeout_s: float = 600.0  # a request unanswered by then is recorded as failed
    speed: float = 1.0  # > 1 replays faster than the trace's clock
    token_low: int = 10  # prompt token ids are drawn from [token_low, token_high)
    token_high: int = 4000
    seed: int = 0
    api_key: str | None = None
    progress: bool = True


def prompt_ids(index: int, n: int, cfg: ReplayConfig) -> list[int]:
    """The prompt of trace record ``index``: ``n`` token ids, the same on every replay."""
    rng = random.Random(cfg.seed * 1_000_003 + index)
    return [rng.randrange(cfg.token_low, cfg.token_high) for _ in range(n)]


def result_row(i: int, rec: TraceRecord, scheduled: float) -> dict:
    """A result with nothing measured yet (the format of the module doc; the simulator's too)."""
    return {"index": i, "endpoint": rec.endpoint, "model": rec.model,
            "application": rec.application, "ttft_slo_s": rec.ttft_slo_s,
            "tpot_slo_ms": rec.tpot_slo_ms, "prompt_tokens": rec.prompt_tokens,
            "max_tokens": rec.max_tokens, "scheduled": round(scheduled, 6),
            "sent": None, "sent_wall": None, "status": None, "error": None, "ttft_s": None,
            "tpot_ms": None, "output_tokens": 0, "finish_reason": None, "chunk_times": []}


def set_timing(res: dict, times: list[float], tokens: int) -> None:
    """Fill TTFT, TPOT and the token count from the arrival times (s since sent) of the streamed
    chunks; TPOT spreads first -> last chunk over the tokens between them."""
    res["chunk_times"] = [round(t, 5) for t in times]
    res["output_tokens"] = tokens
    if times:
        res["ttft_s"] = round(times[0], 6)
        if tokens > 1:
            res["tpot_ms"] = round((times[-1] - times[0]) / (tokens - 1) * 1000, 4)


async def _one(session: aiohttp.ClientSession, i: int, rec: TraceRecord, cfg: ReplayConfig,
               t0: float, res: dict) -> None:
    body = {"model": rec.endpoint, "prompt": prompt_ids(i, rec.prompt_tokens, cfg),
            "max_tokens": rec.max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent = time.monotonic()
    res["sent"], res["sent_wall"] = round(sent - t0, 6), time.time()
    times: list[float] = []
    usage_tokens = None
    async with session.post(cfg.url + "/v1/completions", json=body) as resp:
        res["status"] = resp.status
        if resp.status != 200:
            text = await resp.text()
            try:
                res["error"] = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                res["error"] = text[:500] or f"HTTP {resp.status}"
            return
        done = False
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators and SSE comments (heartbeats)
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                err = event["error"]
                res["error"] = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                return
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or ():
                if choice.get("text"):
                    times.append(time.monotonic() - sent)
                if choice.get("finish_reason"):
                    res["finish_reason"] = choice["finish_reason"]
        if not done:
            res["error"] = "the stream ended without [DONE]"
    set_timing(res, times, usage_tokens if usage_tokens is not None else len(times))
    if not times and res["error"] is None:
        res["error"] = "no token was streamed"


async def _send(session, i, rec, cfg, t0, sem, res, sink) -> None:
    delay = t0 + rec.time / cfg.speed - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    try:
        async with sem:
            await asyncio.wait_for(_one(session, i, rec, cfg, t0, res), cfg.timeout_s)
    except asyncio.TimeoutError:
        res["error"] = f"no complete answer within {cfg.timeout_s:.0f} s"
    except aiohttp.ClientError as e:
        res["error"] = f"connection failed: {e}"
    except asyncio.CancelledError:
        res["error"] = res["error"] or ("cancelled" if res["sent"] is not None else "not sent")
        sink(res)
        raise
    except Exception as e:  # noqa: BLE001 - a malformed answer is recorded, never dropped
        res["error"] = f"{type(e).__name__}: {e}"
    sink(res)


async def replay(records: Sequence[TraceRecord], cfg: ReplayConfig, out: str | Path,
                 meta: dict | None = None) -> list[dict]:
    """Replay ``records``; write results to ``out`` (JSONL) as they come; return them in
    trace order. Cancelling the task records the requests still open or not yet sent."""
    results = [result_row(i, r, r.time / cfg.speed) for i, r in enumerate(records)]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    f: IO[str] = open(path, "w", encoding="utf-8")
    f.write(json.dumps({"meta": {**(meta or {}), "url": cfg.url, "requests": len(records),
                                 "replay": {k: v for k, v in asdict(cfg).items()
                                            if k != "api_key"},
                                 "started_wall": time.time()}}) + "\n")
    bar = _progress(len(records), cfg.progress)
    written: set[int] = set()

    def sink(res: dict) -> None:
        if res["index"] in written:
            return
        written.add(res["index"])
        f.write(json.dumps(res) + "\n")
        f.flush()
        bar.update(res)

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    conn = aiohttp.TCPConnector(limit=cfg.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    try:
        async with aiohttp.ClientSession(connector=conn, timeout=timeout,
                                         headers=headers) as session:
            sem = asyncio.Semaphore(cfg.concurrency)
            t0 = time.monotonic()
            tasks = [asyncio.create_task(_send(session, i, r, cfg, t0, sem, results[i], sink))
                     for i, r in enumerate(records)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for res in results:  # whatever never reached the sink (should not happen) is kept too
            if res["index"] not in written:
                res["error"] = res["error"] or "not sent"
                sink(res)
        f.close()
        bar.close()
    return results


class _progress:
    """A tqdm bar (answered / failed counts) when asked for and available, else nothing."""

    def __init__(self, total: int, enabled: bool):
        self.ok = self.failed = 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="req", desc="replay", smoothing=0.05)
            except ImportError:  # tqdm is optional: replay works without a bar
                self.bar = None

    def update(self, res: dict) -> None:
        if res["error"] is None:
            self.ok += 1
        else:
            self.failed += 1
        if self.bar is not None:
            self.bar.set_postfix(ok=self.ok, failed=self.failed, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_results(path: str | Path) -> tuple[dict, list[dict]]:
    """(meta, results sorted by trace index) of a replay's JSONL output."""
    meta: dict = {}
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a JSON object") from None
        if "meta" in obj and n == 1:
            meta = obj["meta"]
        else:
            out.append(obj)
    return meta, sorted(out, key=lambda r: r["index"])
