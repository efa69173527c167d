"""Adoption: a control plane that starts (after a crash, a restart, or a standby taking over)
lists what runs in the cluster and rebuilds its instances and GPU ledger from it before it
admits a request, so that warm instances stay warm (the cluster is the record).

What each worker reports in its health (its `WorkerSpec` and phase) decides:
  a ready standalone worker        an instance of one stage (a whole model, or a consolidated
                                   pipeline's all-card stage), adopted ready
  a whole ready pipeline           adopted ready, every rank present and joined; if it has
                                   all-card stages it consolidates (a consolidation the dead
                                   control plane began finishes: asking a stage again is a no-op)
  anything else                    stopped and logged: a stage still loading (its start was
                                   the dead control plane's), a pipeline missing a stage or
                                   never joined, a failed worker, a model
                                   that is not registered here; in the lifecycle log its stages
                                   end ("deleted", or "released" where the rest was adopted)
Adopted instances take no NIC booking (their weights are in) and count no cold start.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections import defaultdict
from dataclasses import dataclass

from hydraserve.cluster.base import WorkerClient
from hydraserve.control.instance import Instance, InstanceState, Stage
from hydraserve.control.lifecycle import read_lifecycle
from hydraserve.control.snapshot import Placement, StagePlacement
from hydraserve.control.state import ControlState
from hydraserve.protocol import Phase, WorkerHealth

log = logging.getLogger("hydraserve.control")

HEALTH_TIMEOUT_S = 10.0  # a listed worker that does not answer within this is not adopted


@dataclass
class Found:
    client: WorkerClient
    health: WorkerHealth

    @property
    def spec(self):
        return self.health.spec

    @property
    def ready(self) -> bool:
        return self.health.phase is Phase.READY and self.health.error is None


@dataclass
class Adoption:
    """What a start found: instances adopted, workers stopped."""

    instances: list[str]
    stopped: list[str]


async def adopt(state: ControlState) -> Adoption:
    """Adopt what runs (see the module doc); call before the reconcile loop starts."""
    clients = await state.cluster.list_workers()
    healths = await asyncio.gather(*(_health(c) for c in clients.values()))
    groups: dict[str, list[Found]] = defaultdict(list)
    stop: list[tuple[str, str]] = []  # worker id, why
    for (wid, client), h in zip(clients.items(), healths):
        if isinstance(h, BaseException) or h.spec is None or h.spec.worker_id != wid:
            why = f"its health is unreadable ({h})" if isinstance(h, BaseException) else \
                "it does not report its spec" if h.spec is None else \
                f"it reports being {h.spec.worker_id}"
            stop.append((wid, why))
            continue
        groups[h.spec.instance or h.spec.worker_id].append(Found(client, h))
    adopted = []
    for iid, found in groups.items():
        ep = state.endpoints.get(found[0].spec.model)
        solo = [f for f in found if f.ready and f.health.standalone]
        rest = [f for f in found if f not in solo]
        why = _pipeline_problem(rest)
        if ep is None:
            why, solo = f"its model {found[0].spec.model!r} is not registered here", []
            rest = found
        for f in solo:
            adopted.append(_instance(state, ep, iid if f.spec.rank == 0 else
                                     f"{iid}.r{f.spec.rank}", [f]))
        if rest and why is None:
            adopted.append(_instance(state, ep, iid, sorted(rest, key=lambda f: f.spec.rank)))
        elif rest:
            stop += [(f.spec.worker_id, why) for f in rest]
            # the lifecycle log charges their stages until now, no longer
            if solo:
                state.log("released", instance=iid, ranks=sorted(f.spec.rank for f in rest))
            else:
                state.log("deleted", instance=iid, state="stopped", error=why)
    for wid, why in stop:
        log.warning("worker %s cannot be adopted (%s): stopping it", wid, why)
    await asyncio.gather(*(state.cluster.stop_worker(wid) for wid, _ in stop))
    _number_after(state, [i.id for i in adopted] + _logged_ids(state))
    if adopted or stop:
        log.info("adopted %d instance(s) from the cluster (%s); stopped %d worker(s)",
                 len(adopted), ", ".join(i.id for i in adopted) or "-", len(stop))
    return Adoption([i.id for i in adopted], [wid for wid, _ in stop])


async def _health(client: WorkerClient) -> WorkerHealth | BaseException:
    try:
        return await asyncio.wait_for(client.health(), HEALTH_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - a worker that cannot say what it is is stopped
        return e


def _pipeline_problem(stages: list[Found]) -> str | None:
    """Why these stages of one instance are not an adoptable pipeline (None: they are)."""
    if not stages:
        return None
    p = stages[0].spec.p
    if any(not f.ready for f in stages):
        bad = next(f for f in stages if not f.ready)
        return f"stage {bad.spec.rank} is {bad.health.phase.value}" + \
            (f" ({bad.health.error})" if bad.health.error else "")
    if sorted(f.spec.rank for f in stages) != list(range(p)):
        return f"its pipeline lacks stages (found ranks {sorted(f.spec.rank for f in stages)} " \
               f"of p = {p})"
    if p > 1 and not all(f.health.has("connected") for f in stages):
        return "its pipeline's ring was never joined"
    return None


def _instance(state: ControlState, ep, iid: str, found: list[Found]) -> Instance:
    now = state.clock()
    stages, placed = [], []
    for i, f in enumerate(found):
        spec = f.spec
        claim = state.gpus.adopt(spec.node, spec.gpu, spec.claim_gb)
        stages.append(Stage(i, spec.node, spec.all_card, claim, spec.worker_id, spec.layers,
                            f.client))
        placed.append(StagePlacement(i, spec.node, spec.gpu, spec.claim_gb, spec.all_card))
    p = len(found)
    consolidated = p == 1 and found[0].spec.p > 1
    pipeline = p > 1 and any(f.spec.all_card for f in found)
    placement = Placement(p, tuple(placed), None, consolidate=pipeline, policy="adopted")
    inst = Instance(iid, ep.name, placement, stages, capacity=state.gw.batch_capacity * p,
                    state=InstanceState.READY, consolidated=consolidated, created=now,
                    last_used=now, clock=state.clock)
    inst.mark("adopted")
    state.add(ep, inst)
    state.log("adopted", instance=iid, model=ep.name, p=p,
              stages=[{"rank": s.rank, "node": s.node, "gpu": s.claim.gpu, "gb": s.claim.gb,
                       "all_card": s.all_card, "created": f.spec.instance or iid,
                       "created_rank": f.spec.rank} for s, f in zip(stages, found)])
    log.info("instance %s adopted: %s on %s", iid, f"p={p}" if p > 1 else
             ("consolidated" if consolidated else "p=1"), ",".join(s.node for s in stages))
    return inst


def _logged_ids(state: ControlState) -> list[str]:
    """The instances the lifecycle log names (a predecessor's too: it appends to the same)."""
    if state.lifecycle is None or not state.lifecycle.path.exists():
        return []
    try:
        return [e["instance"] for e in read_lifecycle(state.lifecycle.path)
                if e.get("event") in ("created", "adopted")]
    except (OSError, ValueError, KeyError) as e:
        log.warning("the lifecycle log %s could not be read (%s)", state.lifecycle.path, e)
        return []


def _number_after(state: ControlState, ids: list[str]) -> None:
    """New instances are numbered past every adopted or logged one (ids are MODEL-N[.rR]), so
    that no id of this run's lifecycle log is used twice."""
    nums = [int(m.group(1)) for i in ids if (m := re.search(r"-(\d+)(?:\.r\d+)?$", i))]
    if nums:
        state.ids_from(max(nums) + 1)
