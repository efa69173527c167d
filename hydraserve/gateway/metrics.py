"""Prometheus metrics of one gateway (its own registry, so two gateways can share a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hydraserve.control.controller import Controller
from hydraserve.control.instance import InstanceState

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)


class _ControllerCollector:
    def __init__(self, controller: Controller):
        self.c = controller

    def collect(self):
        queue = GaugeMetricFamily("hydraserve_queue_length", "Requests waiting for an instance",
                                  labels=["model"])
        inst = GaugeMetricFamily("hydraserve_instances", "Instances by state", labels=["model",
                                                                                     "state"])
        cold = CounterMetricFamily("hydraserve_cold_starts", "Instances started",
                                   labels=["model"])
        running = GaugeMetricFamily("hydraserve_running_requests",
                                    "Requests an instance is generating for now",
                                    labels=["model", "instance"])
        counters = {
            "refused": CounterMetricFamily(
                "hydraserve_refused_requests", "Requests refused with 429: no free slot and a "
                "full queue", labels=["model"]),
            "cancelled": CounterMetricFamily(
                "hydraserve_cancelled_requests", "Requests whose client went away before they "
                "ended (aborted on the worker at its next step)", labels=["model"]),
            "resumed": CounterMetricFamily(
                "hydraserve_resumed_requests", "Streams placed again after their instance was "
                "lost mid-stream (continued from the tokens already sent)", labels=["model"]),
        }
        for name, ep in self.c.models().items():
            queue.add_metric([name], len(ep.queue))
            cold.add_metric([name], ep.cold_starts)
            for state in InstanceState:
                inst.add_metric([name, state.value],
                                sum(1 for i in ep.instances if i.state is state))
            for i in ep.instances:
                running.add_metric([name, i.id], i.active)
            for attr, family in counters.items():
                family.add_metric([name], getattr(ep, attr))
        yield queue
        yield inst
        yield cold
        yield running
        yield from counters.values()


class Metrics:
    def __init__(self, controller: Controller):
        self.registry = CollectorRegistry()
        self.registry.register(_ControllerCollector(controller))
        self.ttft = Histogram("hydraserve_ttft_seconds", "Time to first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("hydraserve_tpot_seconds", "Time per output token", ["model"],
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.requests = Counter("hydraserve_requests", "Finished requests",
                                ["model", "status"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
