"""The autoscaling rule, a pure function of what an endpoint looks like now.

Scale up: every ``batch_capacity`` requests still queued after dispatch, beyond the slots of
the instances already starting, ask for one more instance (placement may give fewer). Scale
down: a ready instance idle (no request, not consolidating) for longer than the keep-alive
stops. The reconcile loop builds the view, calls `decide` and carries the decision out; tests
call `decide` on tables of views.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hydraserve.control.instance import Instance, InstanceState


@dataclass(frozen=True)
class InstanceView:
    id: str
    state: InstanceState
    capacity: int
    active: int
    last_used: float
    consolidating: bool = False

    @classmethod
    def of(cls, inst: Instance) -> InstanceView:
        return cls(inst.id, inst.state, inst.capacity, inst.active, inst.last_used,
                   inst.consolidating)


@dataclass(frozen=True)
class EndpointView:
    queued: int  # requests waiting after dispatch
    instances: tuple[InstanceView, ...] = ()


@dataclass(frozen=True)
class AutoscaleConfig:
    batch_capacity: int = 8  # requests one instance serves at once (per stage of a pipeline)
    keep_alive_s: float = 60.0


@dataclass(frozen=True)
class Decision:
    start: int = 0  # instances wanted now
    stop: tuple[str, ...] = ()  # ids of the instances to stop, idle past the keep-alive


def decide(view: EndpointView, now: float, cfg: AutoscaleConfig) -> Decision:
    starting = sum(i.capacity for i in view.instances if i.state is InstanceState.STARTING)
    unserved = view.queued - starting
    start = math.ceil(unserved / cfg.batch_capacity) if unserved > 0 else 0
    stop = tuple(i.id for i in view.instances
                 if i.state is InstanceState.READY and i.active == 0 and not i.consolidating
                 and now - i.last_used > cfg.keep_alive_s)
    return Decision(start, stop)
