"""Consolidation of a serving pipeline (PAPER.md 5): its all-card stages take the whole model,
the head migrates the KV of its running requests; the part-card GPUs are then freed and the
other all-card stages become standalone instances. The pipeline serves throughout."""
from __future__ import annotations

import asyncio
import logging

from hydraserve.control.instance import Instance, InstanceState, Stage
from hydraserve.control.state import ControlState, Endpoint

FIRST_TOKEN_WAIT_S = 120.0  # the longest consolidation waits for the instance's first token
MERGE_WAIT_S = 3600.0  # the longest wait for a stage to consolidate (a long-poll, re-armed)

log = logging.getLogger("hydraserve.control")


class Consolidation:
    def __init__(self, state: ControlState):
        self.s = state

    async def run(self, ep: Endpoint, inst: Instance) -> None:
        """Consolidate ``inst`` once it has served its first requests and its all-card nodes'
        NICs are free for the rest of the model."""
        s = self.s
        all_card = [st for st in inst.stages if st.all_card]
        # at low priority: let the requests that started the instance get their first token
        # before the rest of the model competes with them for the head's CPU and copies (at
        # "ready" they may still be queued, not yet dispatched: wait for them too)
        deadline = s.clock() + FIRST_TOKEN_WAIT_S
        while "first_token" not in inst.timeline and inst.state is InstanceState.READY and \
                (inst.active or ep.queue) and s.clock() < deadline:
            await asyncio.sleep(0.02)
        # and let each all-card stage finish its own fetch: the rest would share its NIC
        while any(st.fetch is not None for st in all_card) and inst.state is InstanceState.READY:
            await asyncio.sleep(0.05)
        booked = await self._book_rest(ep, inst, all_card)
        if inst.state is not InstanceState.READY:
            for b in booked:
                s.release_fetch(b)
            return
        inst.mark("consolidation_started")
        inst.consolidating = True  # keep-alive leaves it alone until this ends either way
        s.touch(ep)
        try:
            await self._merge(ep, inst, all_card, booked)
        finally:
            inst.consolidating = False
            s.touch(ep)

    async def _book_rest(self, ep: Endpoint, inst: Instance,
                         all_card: list[Stage]) -> list[Stage]:
        """The rest of the model is fetched with the node's NIC to itself (PAPER.md 5): wait
        until each all-card node is free of other fetches, then book it exclusively."""
        s = self.s
        rest_gbits = ep.size_gb * 8 * (inst.placement.p - 1) / inst.placement.p
        booked = []
        for st in all_card:
            while inst.state is InstanceState.READY:
                now = s.clock()
                s.nics.advance(now)
                fetch = s.nics.exclusive(st.node, rest_gbits, now)
                if fetch is not None:
                    booked.append(Stage(st.rank, st.node, True, st.claim, st.worker_id,
                                        fetch=fetch))
                    break
                await asyncio.sleep(0.1)
        return booked

    async def _merge(self, ep: Endpoint, inst: Instance, all_card: list[Stage],
                     booked: list[Stage]) -> None:
        """Consolidation proper: the all-card stages take the whole model (their rest fetches
        booked in ``booked``), then the part-card stages go."""
        s = self.s
        try:
            await asyncio.gather(*(st.client.consolidate() for st in all_card))
            for st in all_card:
                while inst.state is InstanceState.READY:
                    h = await st.client.wait_for("consolidated", MERGE_WAIT_S)
                    if h.has("consolidated"):
                        break
                    if h.ended or h.error:
                        raise RuntimeError(h.error or f"stage {st.rank} is {h.phase.value}")
        except Exception as e:  # noqa: BLE001 - the pipeline keeps serving as it is
            if inst.state is InstanceState.READY:
                log.warning("instance %s: consolidation failed (%s); it stays a pipeline",
                            inst.id, e)
                self._ended(inst, "failed")
                s.emit("failure", kind="consolidation_failed", model=inst.model,
                       instance=inst.id)
                return
        finally:
            for b in booked:
                s.release_fetch(b)
        if inst.state is not InstanceState.READY:  # stopped (or lost) while it consolidated
            log.info("instance %s: consolidation ended: the instance is %s", inst.id,
                     inst.state.value)
            self._ended(inst, "abandoned")
            return
        await self._split(ep, inst)
        self._ended(inst, "done")

    def _ended(self, inst: Instance, outcome: str) -> None:
        t = inst.timeline
        start = t.get("consolidation_started")
        seconds = None if start is None else round(t.get("consolidated", inst.clock() -
                                                         inst.created) - start, 6)
        self.s.emit("consolidation", model=inst.model, instance=inst.id, outcome=outcome,
                    seconds=seconds)

    async def _split(self, ep: Endpoint, inst: Instance) -> None:
        """The head serves the whole model: free the part-card stages, and make each other
        all-card stage a standalone instance of its own."""
        s = self.s
        head, others = inst.stages[0], inst.stages[1:]
        for st in others:
            s.release_fetch(st)
            if not st.all_card:
                await s.cluster.stop_worker(st.worker_id)
                s.gpus.release(st.claim)
        inst.stages = [head]
        inst.capacity = s.gw.batch_capacity
        s.touch(ep)
        inst.consolidated = True
        inst.mark("consolidated")
        split = []
        for st in others:
            if st.all_card:
                iid = s.new_id(ep.name)
                split.append({"rank": st.rank, "instance": iid})
                now = s.clock()
                solo = Instance(iid, ep.name, inst.placement,
                                [Stage(0, st.node, True, st.claim, st.worker_id, st.layers,
                                       st.client)],
                                capacity=s.gw.batch_capacity, state=InstanceState.READY,
                                consolidated=True, created=now, last_used=now, clock=s.clock)
                solo.mark("ready")
                s.add(ep, solo)
        s.log("consolidated", instance=inst.id,
              released=[st.rank for st in others if not st.all_card], split=split)
        log.info("instance %s consolidated into %s", inst.id, head.node)
        s.wake()
