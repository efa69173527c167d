"""The worker's engine side: one pipeline stage (or a whole model), its threads and its ring.

Stages form a ring over TCP: rank r sends to rank (r + 1) % p. The head (rank 0) owns the
scheduler and its engine thread is the only writer of scheduling state; it runs stage 0, sends
the hidden states on with the :class:`StepBatch`, and keeps up to p batches in flight. Every
other stage runs a loop: receive, execute its layers, send on; the last one samples and sends the
tokens back to the head. A broken connection fails the stage, which closes both of its sockets,
so the failure travels round the ring and the head errors every open request within moments.

Consolidation (an all-card stage taking the whole model over) is in `consolidation`.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from hydraserve.engine.batch import StepBatch
from hydraserve.engine.config import EngineConfig
from hydraserve.engine.h2d import CudaBackend
from hydraserve.engine.runner import StageRunner
from hydraserve.engine.sampler import pick
from hydraserve.engine.scheduler import Scheduler
from hydraserve.engine.sequence import SamplingParams
from hydraserve.engine.stream_load import iter_region, region_model_config
from hydraserve.protocol import (HANDOVER, ErrorEvent, Peer, Phase, TokenEvent, WorkerHealth,
                                 WorkerSpec)
from hydraserve.store.layout import StageSpec
from hydraserve.store.progressive import ProgressiveRegion
from hydraserve.worker.consolidation import Consolidation
from hydraserve.worker.emulation import GpuEmulation
from hydraserve.worker.timeline import Timeline
from hydraserve.worker.transport import ConnectionClosed, recv_msg, send_msg

log = logging.getLogger("hydraserve.worker")

Sink = Callable[[dict], None]  # receives {"token_id", "finish_reason"} or {"error", ...}


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    model: str
    rank: int
    p: int
    layers: tuple[int, int]
    all_card: bool
    agent: str
    engine: EngineConfig
    host: str = "127.0.0.1"
    stage_port: int = 0
    streaming_load: bool = True  # False: wait for every byte, then load (a baseline)
    token: str | None = None  # the cluster token, sent with the calls to the agent
    emulation: GpuEmulation = GpuEmulation()  # a stock engine's GPU costs (none by default)
    started_as: WorkerSpec | None = None  # reported in /health: what a new control plane adopts


class Worker(Consolidation):
    def __init__(self, cfg: WorkerConfig, region: ProgressiveRegion, timeline: Timeline,
                 h2d: CudaBackend | None = None):
        """``h2d``: the CUDA calls of the loads (default: the real ones on CUDA; tests record
        them with a fake)."""
        if cfg.engine.num_kv_blocks is None:
            raise ValueError("a worker needs num_kv_blocks: every stage must have the same count")
        self.cfg, self.region, self.timeline = cfg, region, timeline
        self.h2d = h2d
        self.spec = StageSpec(cfg.rank, cfg.p, *cfg.layers)
        self.state = Phase.LOADING
        self.error: str | None = None
        self.runner: StageRunner | None = None
        self.scheduler: Scheduler | None = None
        self.standalone = cfg.p == 1  # runs the whole model by itself
        self.weights_ready = threading.Event()
        self.stopping = threading.Event()
        self.exit_requested = threading.Event()  # the API server watches this
        self.events: queue.Queue = queue.Queue()
        self.listener = socket.create_server((cfg.host, cfg.stage_port))
        self.stage_port = self.listener.getsockname()[1]
        self.next_sock: socket.socket | None = None
        self.prev_sock: socket.socket | None = None
        self.connected = False
        # head / standalone engine state, owned by the engine thread
        self.in_flight: dict[int, StepBatch] = {}
        self.sinks: dict[int, Sink] = {}
        self.seq_of_key: dict[str, int] = {}
        self.switching = False
        self.kv_pending = False
        # consolidation
        self.rest_loaded = threading.Event()
        self.rest_region: ProgressiveRegion | None = None
        self._standalone_lock = threading.Lock()
        self.released = threading.Event()
        self.engine_thread: threading.Thread | None = None
        self.loader_thread: threading.Thread | None = None  # reads self.region, closes it
        self.rest_thread: threading.Thread | None = None  # reads self.rest_region, closes it
        self.steps = 0  # engine steps launched (head / standalone)
        self.aborted = 0  # sequences aborted (client gone, handed over)

    @property
    def is_head(self) -> bool:
        return self.cfg.rank == 0

    # -- loading ------------------------------------------------------------------------------
    def start_loading(self) -> None:
        self.loader_thread = threading.Thread(target=self._load, name="loader", daemon=True)
        self.loader_thread.start()

    def _load(self) -> None:
        try:
            model_cfg = region_model_config(self.region)
            max_len = min(self.cfg.engine.max_model_len, model_cfg.max_position)
            blocks = self.cfg.engine.num_kv_blocks
            runner = StageRunner(model_cfg, self.spec, self.cfg.engine, blocks, max_len, self.h2d)
            if not self.cfg.streaming_load:
                self.region.wait_for(self.region.length)
            copy_started, nbytes = time.monotonic(), self.region.length
            # on CUDA the region is pinned for the load, which returns once every copy landed
            runner.load(iter_region(self.region), self.region.data)
            self.cfg.emulation.pace_load(nbytes, copy_started, self.stopping)
            self.timeline.mark("weights_ready")
            self.cfg.emulation.profile(self.timeline, self.stopping)
            if self.is_head or self.standalone:
                self.scheduler = Scheduler(self.cfg.engine, blocks, max_len, model_cfg.eos_token_ids)
            self.runner = runner
            self.state = Phase.READY
            self.timeline.mark("engine_ready")
        except Exception as e:  # noqa: BLE001 - reported through /health and to callers
            if self.stopping.is_set():
                log.info("worker %s: loading abandoned (stopping)", self.cfg.worker_id)
            else:
                log.exception("worker %s: loading failed", self.cfg.worker_id)
            self._fail(f"loading failed: {e}")
        finally:
            # the weights are copied (or will never be): the agent may free the region; only
            # this thread closes it, so a stop never pulls the mapping from under a read
            region, self.region = self.region, None
            if region is not None:
                region.close()
            self.weights_ready.set()

    # -- ring -------------------------------------------------------------------------------
    def connect(self, peers: list[Peer], timeout: float = 30.0) -> None:
        """Join the ring of ``peers``; returns once both neighbours are connected. Then starts
        this worker's threads."""
        if self.connected:
            return
        if self.cfg.p > 1:
            by_rank = {p.rank: p for p in peers}
            nxt = by_rank[(self.cfg.rank + 1) % self.cfg.p]
            accepted: list[socket.socket] = []
            self.listener.settimeout(timeout)
            acceptor = threading.Thread(target=lambda: accepted.append(self.listener.accept()[0]))
            acceptor.start()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self.next_sock = socket.create_connection((nxt.host, nxt.stage_port), 5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise ConnectionError(f"cannot reach stage {nxt.rank}") from None
                    time.sleep(0.05)
            acceptor.join(timeout)
            if not accepted:
                raise ConnectionError("the previous stage did not connect")
            self.prev_sock = accepted[0]
            for s in (self.next_sock, self.prev_sock):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
        self.connected = True
        self.timeline.mark("connected")
        if self.is_head or self.standalone:
            if self.cfg.p > 1:
                threading.Thread(target=self._receive_loop, name="receiver", daemon=True).start()
            self._start_engine()
        else:
            threading.Thread(target=self._stage_loop, name="stage", daemon=True).start()

    def _start_engine(self) -> None:
        self.engine_thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        self.engine_thread.start()

    def _send(self, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        send_msg(self.next_sock, header, tensors)

    # -- requests (called from the API's event loop) -------------------------------------------
    def can_generate(self) -> str | None:
        """None if /generate may be called now, else why not."""
        if self.state is Phase.FAILED:
            return f"worker failed: {self.error}"
        if self.state is Phase.STOPPED or self.stopping.is_set():
            return "worker is stopping"
        if not (self.is_head or self.standalone):
            return f"stage {self.cfg.rank} is not the head of its pipeline"
        if not self.connected:
            return "worker is not initialised (POST /init first)"
        return None

    def submit(self, key: str, prompt_ids: list[int], params: SamplingParams, sink: Sink,
               output_ids: list[int] | tuple[int, ...] = ()) -> None:
        """Queue a request for the engine thread; ``output_ids``: tokens it already produced
        elsewhere (a resumed stream continues at output index len(output_ids))."""
        self.events.put(("add", key, prompt_ids, params, sink, tuple(output_ids)))

    def abort(self, key: str) -> None:
        self.events.put(("abort", key))

    # -- head / standalone engine thread ---------------------------------------------------------
    def _engine_loop(self) -> None:
        """Continuous batching: events (new requests, aborts, tokens back from the ring) are
        handled between every two steps, so a request joins the running batch at the next step
        and an abort frees its blocks there, in every mode (standalone, head, consolidated)."""
        self.weights_ready.wait()
        while not self.stopping.is_set():
            self._handle_events(block=False)
            if self.switching and not self.in_flight and not self.kv_pending:
                self._pull_kv()
            batch = None
            depth = 1 if self.standalone else self.cfg.p  # batches a pipeline keeps in flight
            if (self.state is Phase.READY and not self.switching
                    and len(self.in_flight) < depth):
                batch = self.scheduler.schedule()
            if batch is not None:
                self._launch(batch)
            else:
                self._handle_events(block=True)

    def _handle_events(self, block: bool) -> None:
        try:
            ev = self.events.get(timeout=0.05) if block else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(ev)
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return

    def _handle(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "add":
            _, key, prompt, params, sink, output_ids = ev
            if self.state is not Phase.READY:
                sink(ErrorEvent(f"worker is {self.state.value}: {self.error}").to_json())
                return
            try:
                seq_id = self.scheduler.add(prompt, params, output_ids)
            except ValueError as e:
                sink(ErrorEvent(str(e), 400).to_json())  # the request's fault, not the worker's
                return
            self.sinks[seq_id] = sink
            self.seq_of_key[key] = seq_id
        elif kind == "abort":
            seq_id = self.seq_of_key.pop(ev[1], None)
            if seq_id is not None:
                self.sinks.pop(seq_id, None)
                self.scheduler.abort(seq_id)
                self.aborted += 1
        elif kind == "handover":
            n = len(self.sinks)
            self._fail_requests(HANDOVER, handover=True)
            self.aborted += n
            log.info("worker %s: handed %d stream(s) over", self.cfg.worker_id, n)
            ev[1].set()
        elif kind == "tokens":
            batch = self.in_flight.pop(ev[1], None)
            if batch is not None:
                self._apply(batch, ev[2], ev[3])
        elif kind == "kv":
            self._install_kv(ev[1], ev[2])
        elif kind == "rest_loaded":
            if self.standalone:
                return
            self.switching = True
            log.info("worker %s: whole model loaded; draining %d pipeline batch(es)",
                     self.cfg.worker_id, len(self.in_flight))
        elif kind == "failed":
            self._fail_requests(ev[1])

    def _launch(self, batch: StepBatch) -> None:
        self.steps += 1
        try:
            out = self.runner.execute(batch, None)
            if self.standalone:
                picks = pick(out, batch.samples)
                self._apply(batch, picks.tokens, picks.extras)
                return
            self.in_flight[batch.step_id] = batch
            self._send({"type": "batch", "batch": batch.to_dict()}, {"hidden": out})
        except (ConnectionError, OSError) as e:
            self._fail(f"pipeline connection lost: {e}")
            self._fail_requests(self.error)

    def _apply(self, batch: StepBatch, tokens: list[int],
               extras: list[dict | None] | None = None) -> None:
        extra = dict(zip(batch.seq_ids, extras or ()))
        for out in self.scheduler.update(batch, tokens):
            sink = self.sinks.get(out.seq_id)
            if sink is None:
                continue
            self.timeline.mark("first_token")
            reason = out.finish_reason.value if out.finish_reason else None
            sink(TokenEvent(out.token_id, reason, **(extra.get(out.seq_id) or {})).to_json())
            if reason is not None:
                del self.sinks[out.seq_id]
        if not self.sinks:
            self.seq_of_key.clear()

    def _fail_requests(self, message: str, handover: bool = False) -> None:
        """End every open stream with an error item; ``handover``: the worker is leaving in
        order, and the control plane continues each stream elsewhere."""
        item = ErrorEvent(message, handover=handover)
        for seq_id, sink in list(self.sinks.items()):
            sink(item.to_json())
            self.scheduler.abort(seq_id)
        self.sinks.clear()
        self.seq_of_key.clear()
        self.in_flight.clear()

    def _receive_loop(self) -> None:
        try:
            while not self.stopping.is_set():
                header, tensors = recv_msg(self.prev_sock)
                kind = header["type"]
                if kind == "tokens":
                    self.events.put(("tokens", header["step_id"], header["tokens"],
                                     header.get("extras")))
                elif kind == "kv":
                    self.events.put(("kv", header, tensors))
                elif kind == "release":
                    return  # it went round the ring: the pipeline is gone
        except (ConnectionClosed, OSError) as e:
            if not self.stopping.is_set() and not self.standalone:
                self._fail(f"pipeline connection lost: {e}")
                self.events.put(("failed", f"a pipeline stage failed: {e}"))

    # -- the other stages ----------------------------------------------------------------------
    def _stage_loop(self) -> None:
        try:
            while not self.stopping.is_set():
                header, tensors = recv_msg(self.prev_sock)
                kind = header["type"]
                if kind in ("batch", "kv_pull"):
                    self.weights_ready.wait()
                    if self.state is not Phase.READY:
                        raise ConnectionError(f"this stage cannot serve: {self.error}")
                if kind == "batch":
                    batch = StepBatch.from_dict(header["batch"])
                    out = self.runner.execute(batch, tensors["hidden"])
                    if self.runner.active.is_last:
                        self._send({"type": "tokens", "step_id": batch.step_id,
                                    **pick(out, batch.samples).to_json()})
                    else:
                        self._send(header, {"hidden": out})
                elif kind == "kv_pull":
                    kv = self._kv_tensors(header["blocks"], self.runner.active.layers)
                    last = self.runner.active.is_last
                    self._send({**header, "type": "kv" if last else "kv_pull"}, {**tensors, **kv})
                elif kind == "release":
                    self._send(header)
                    self._on_release()
                    return
        except (ConnectionClosed, OSError) as e:
            if not self.stopping.is_set():
                self._fail(f"pipeline connection lost: {e}")

    # -- state ------------------------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        if self.state is Phase.FAILED:
            return
        log.error("worker %s: %s", self.cfg.worker_id, message)
        self.state, self.error = Phase.FAILED, message
        self.timeline.notify()  # a long-poll of /health learns of it now
        self._close_ring()

    def _close_ring(self) -> None:
        for s in (self.next_sock, self.prev_sock):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def hand_over(self, timeout: float = 5.0) -> None:
        """A planned stop: end every open stream with a handover item (the control plane
        resumes each one elsewhere from its tokens so far) before anything closes. Blocks until
        the engine thread did it, at most ``timeout`` seconds (one step at most, normally)."""
        if self.stopping.is_set() or self.engine_thread is None \
                or not self.engine_thread.is_alive():
            return
        done = threading.Event()
        self.events.put(("handover", done))
        done.wait(timeout)

    def stop(self, handover: bool = True) -> None:
        """Leave everything: open streams handed over (see hand_over), sockets closed, regions
        released; the process then exits."""
        if self.stopping.is_set():
            return
        if handover:
            self.hand_over()
        self.stopping.set()
        if self.state is not Phase.FAILED:
            self.state = Phase.STOPPED
        self.timeline.notify()
        self._close_ring()
        self.listener.close()
        # a region still being read belongs to its reading thread, which closes it when its
        # read stops (closing it here made that read fail on a vanished mapping)
        for region, reader in ((self.region, self.loader_thread),
                               (self.rest_region, self.rest_thread)):
            if region is None:
                continue
            if reader is not None and reader.is_alive():
                region.cancel()
            else:
                region.close()
        self.exit_requested.set()

    def health(self) -> WorkerHealth:
        r, s = self.runner, self.scheduler
        return WorkerHealth(
            self.state, self.cfg.worker_id, self.error, self.stage_port, self.standalone,
            self.timeline.as_dict(), spec=self.cfg.started_as, running=len(s.running) if s else 0,
            waiting=len(s.waiting) if s else 0, steps=self.steps, aborted=self.aborted,
            kv_blocks=self.cfg.engine.num_kv_blocks,
            kv_blocks_free=s.allocator.num_free if s else None,
            extra={"pid": os.getpid(), "model": self.cfg.model, "rank": self.cfg.rank,
                   "p": self.cfg.p, "layers": list(self.cfg.layers),
                   "all_card": self.cfg.all_card, "connected": self.connected,
                   "active_layers": [r.active.layer_start, r.active.layer_end] if r else None,
                   "held_layers": [r.spec.layer_start, r.spec.layer_end] if r else None,
                   "in_flight_batches": len(self.in_flight),
                   "preemptions": s.num_preemptions if s else 0})
