"""The request router: admission, the per-model FIFO queue, dispatch to instances with free
slots, and relaying each stream from its instance's head worker to the request.

A request whose instance is lost mid-stream (a stage died, its server went away, or its
worker left in order and handed the stream over) goes back to the front of its queue with the
tokens it has and continues on another instance after them, while its retry budget lasts."""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable

from hydraserve.cluster.base import WorkerError
from hydraserve.control.instance import Instance, InstanceState, Request
from hydraserve.control.state import ControlState, Draining, Endpoint, QueueFull
from hydraserve.protocol import ErrorEvent, GenerateRequest

LOST = ("the model's worker was lost while serving this request and it could not be placed "
        "again; details are in the server log")
SHUTTING_DOWN = {"error": "the server is shutting down", "status": 503}

log = logging.getLogger("hydraserve.control")


class Router:
    def __init__(self, state: ControlState,
                 retire: Callable[[Instance, InstanceState], None],
                 first_token: Callable[[Instance], None] = lambda inst: None):
        """``retire``: stop a lost instance in the background; ``first_token``: an instance
        gave its first token (both the fleet's)."""
        self.s = state
        self.retire = retire
        self.first_token = first_token

    def free_slots(self, ep: Endpoint) -> int:
        """Requests the endpoint's ready and starting instances can still take."""
        return sum(max(0, i.capacity - i.active) for i in ep.instances
                   if i.state in (InstanceState.READY, InstanceState.STARTING))

    def submit(self, req: Request) -> None:
        """Admit a request: while a ready or starting instance has a free slot, or the queue
        has room (``max_queue`` beyond those slots); else `QueueFull`."""
        s = self.s
        ep = s.endpoints[req.model]
        if s.draining:
            raise Draining("the server is shutting down")
        if len(ep.queue) >= s.gw.max_queue + self.free_slots(ep):
            ep.refused += 1
            raise QueueFull(f"{len(ep.queue)} requests are queued for {req.model} and its "
                            f"instances have no free slot")
        if req.params.get("temperature") and req.params.get("seed") is None:
            # sampling is stateless given (seed, i): with the seed fixed here, a stream that
            # loses its worker continues elsewhere exactly as it would have
            req.params["seed"] = secrets.randbits(62)
        ep.queue.append(req)
        s.touch(ep)
        s.wake()

    def cancel(self, req: Request, by_client: bool = True) -> None:
        """End a request early: its client went away, or (``by_client`` False) the gateway
        has all it wants of it (a stop string)."""
        if req.cancelled:
            return
        req.cancelled = True
        ep = self.s.endpoints.get(req.model)
        if by_client and ep is not None:
            ep.cancelled += 1
        if req.task is not None:
            req.task.cancel()
        self.s.touch(ep)
        self.s.wake()

    async def drain(self, grace_s: float) -> int:
        """Shutting down: refuse new requests, give the open ones ``grace_s`` seconds to finish,
        then end each one still open with a 503 error event. Returns how many were ended so."""
        s = self.s
        s.draining = True
        deadline = s.clock() + grace_s
        while s.clock() < deadline and (s.serving or any(ep.queue for ep in s.endpoints.values())):
            await asyncio.sleep(0.05)
        ended = 0
        for ep in s.endpoints.values():
            queued, ep.queue = ep.queue, []
            s.touch(ep)
            for req in queued:
                req.events.put_nowait(dict(SHUTTING_DOWN))
                ended += 1
        for req in list(s.serving.values()):
            s.serving.pop(req.id, None)
            req.events.put_nowait(dict(SHUTTING_DOWN))
            if req.task is not None:
                req.task.cancel()
            ended += 1
        return ended

    def expire(self, ep: Endpoint, now: float) -> None:
        """Drop cancelled requests from the queue; end those queued past the queue timeout."""
        ep.queue = [r for r in ep.queue if not r.cancelled]
        timeout = self.s.gw.queue_timeout_s
        for r in [r for r in ep.queue if now - r.queued_at > timeout]:
            ep.queue.remove(r)
            self.s.emit("failure", kind="queue_timeout", model=ep.name, request=r.id)
            r.events.put_nowait({"error": f"no instance of {ep.name} could be started within "
                                          f"{timeout:.0f} s (the cluster has no room for it)",
                                 "status": 503})

    def assign(self, ep: Endpoint) -> None:
        """Hand queued requests, in order, to the instances' free slots."""
        for inst in ep.instances:
            while ep.queue and inst.free_slots:
                self.dispatch(inst, ep.queue.pop(0))

    def dispatch(self, inst: Instance, req: Request) -> None:
        inst.active += 1
        self.s.touch_model(inst.model)
        req.instance = inst.id
        req.placed.set()
        self.s.serving[req.id] = req
        req.task = self.s.spawn(self._serve(inst, req))

    async def _serve(self, inst: Instance, req: Request) -> None:
        """Relay one request's stream from its instance; if the instance is lost, retire it
        and queue the request again (it continues from its tokens so far)."""
        s = self.s
        try:
            lost = await self._relay(inst, req)
            if lost is not None:
                detail, handover = lost
                if inst.state is InstanceState.READY:
                    # it takes no more requests; the requests it still has are lost alike
                    inst.error = detail
                    if handover:
                        log.info("instance %s is leaving (its worker handed its streams over)",
                                 inst.id)
                    else:
                        log.error("instance %s failed while serving: %s", inst.id, detail)
                        s.emit("failure", kind="worker_lost", model=inst.model,
                               instance=inst.id)
                    self.retire(inst, InstanceState.STOPPED if handover else InstanceState.FAILED)
                self._place_again(req, f"instance {inst.id}: {detail}")
        finally:
            s.serving.pop(req.id, None)
            inst.active -= 1
            inst.last_used = s.clock()
            s.touch_model(inst.model)  # and the request put back in its queue, if it was
            s.log("request_end", instance=inst.id, model=inst.model, request=req.id,
                  tokens=req.tokens)
            s.wake()

    async def _relay(self, inst: Instance, req: Request) -> tuple[str, bool] | None:
        """Pass the instance's token events on to the request. None once the request ended
        (finished, or refused as invalid); else why the instance lost it, and whether in order
        (a handover)."""
        body = GenerateRequest(req.prompt_ids, req.params, list(req.output_ids))
        try:
            async for ev in inst.head.client.generate(body):
                if isinstance(ev, ErrorEvent):
                    if ev.status == 400:  # the request's fault; the worker is fine
                        req.events.put_nowait({"error": ev.error, "status": 400})
                        return None
                    return ev.error, ev.handover
                if req.first_token is None:
                    req.first_token = self.s.clock()
                    if "first_token" not in inst.timeline:
                        inst.mark("first_token")
                        self.first_token(inst)
                if ev.token_id is not None:
                    req.output_ids.append(ev.token_id)
                req.events.put_nowait(ev.to_json())
                if ev.finish_reason:
                    return None
        except WorkerError as e:
            if e.status == 400:
                req.events.put_nowait({"error": str(e), "status": 400})
                return None
            return str(e), False
        return "the worker closed the stream early", False

    def _place_again(self, req: Request, detail: str) -> None:
        """A request's instance was lost: queue it again at the front (it continues from its
        tokens so far) while its retry budget lasts, else end it with a clear error event.
        Its deadline is the queue timeout, counted from now."""
        s = self.s
        ep = s.endpoints.get(req.model)
        if (req.retries < s.gw.failover_retries and ep is not None and not s.closing
                and not s.draining and not req.cancelled):
            req.retries += 1
            req.instance = None
            req.queued_at = s.clock()
            if req.output_ids:
                ep.resumed += 1
            ep.queue.insert(0, req)
            log.warning("request %s goes back to the queue after %d token(s) (%s)", req.id,
                        req.tokens, detail)
            return
        log.error("request %s failed after %d retries: %s", req.id, req.retries, detail)
        s.emit("failure", kind="request_lost", model=req.model, request=req.id)
        req.events.put_nowait({"error": LOST, "status": 503})
