"""Prometheus metrics of one gateway (its own registry, so two gateways can share a process).

Names follow Prometheus' conventions: base units (seconds, bytes), ``_total`` on counters (the
client adds it), one unit per metric. What the control plane does is observed through its
events (`OperatorView.subscribe`): each cold start's phases, each fetch, each consolidation and
each failure; what it holds now (queues, instances, GPU memory, NIC bookings, warm runtimes) is
read at every scrape. `scripts/grafana/hydraserve.json` is a dashboard of these metrics.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hydraserve.control.controller import Controller
from hydraserve.control.instance import InstanceState

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3, 5)
GBPS_BUCKETS = tuple(x * 1e9 / 8 for x in (0.1, 0.5, 1, 2, 4, 8, 16, 25, 50, 100))  # bytes/s
CONSOLIDATION_BUCKETS = (0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


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
        yield from self._resources()

    def _resources(self):
        total = GaugeMetricFamily("hydraserve_gpu_memory_bytes", "GPU memory the control plane "
                                  "may book, per server and GPU (the cluster's bytes: the "
                                  "paper's scale)", labels=["server", "gpu"])
        booked = GaugeMetricFamily("hydraserve_gpu_memory_booked_bytes", "GPU memory booked by "
                                   "instances' stages", labels=["server", "gpu"])
        free = GaugeMetricFamily("hydraserve_gpu_memory_free_bytes", "GPU memory a new stage "
                                 "could book (0 on a held GPU where GPUs are not shared)",
                                 labels=["server", "gpu"])
        nic = GaugeMetricFamily("hydraserve_nic_fetch_bookings", "Fetches booked on a "
                                "server's NIC now", labels=["server"])
        nic_bw = GaugeMetricFamily("hydraserve_nic_bandwidth_bytes_per_second", "A server's "
                                   "NIC bandwidth", labels=["server"])
        warm = GaugeMetricFamily("hydraserve_warm_runtimes", "Pre-started runtimes waiting "
                                 "for a worker to become (imported: their imports are done)",
                                 labels=["server", "state"])
        for r in self.c.view.resources():
            for g in r["gpus"]:
                labels = [r["server"], str(g["gpu"])]
                total.add_metric(labels, g["total_gb"] * 1e9)
                booked.add_metric(labels, g["booked_gb"] * 1e9)
                free.add_metric(labels, g["free_gb"] * 1e9)
            nic.add_metric([r["server"]], r["fetches"])
            nic_bw.add_metric([r["server"]], r["nic_gbps"] * 1e9 / 8)
            for state, n in r["warm"].items():
                warm.add_metric([r["server"], state], n)
        yield from (total, booked, free, nic, nic_bw, warm)


class Metrics:
    def __init__(self, controller: Controller):
        self.registry = CollectorRegistry()
        self.registry.register(_ControllerCollector(controller))
        r = self.registry
        self.ttft = Histogram("hydraserve_ttft_seconds", "Time to first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("hydraserve_tpot_seconds", "Time per output token", ["model"],
                              buckets=TPOT_BUCKETS, registry=r)
        self.requests = Counter("hydraserve_requests", "Finished requests",
                                ["model", "status"], registry=r)
        self.phase = Histogram(
            "hydraserve_cold_start_phase_seconds", "What each phase of a cold start added to "
            "the time to its first token (critical path: the phases of one start add up to "
            "its TTFT)", ["model", "exec_type", "p", "phase"], buckets=PHASE_BUCKETS, registry=r)
        self.cold_ttft = Histogram(
            "hydraserve_cold_start_ttft_seconds", "Time to first token of the request a cold "
            "start was for", ["model", "exec_type", "p"], buckets=TTFT_BUCKETS, registry=r)
        self.ratio = Histogram(
            "hydraserve_cold_start_ttft_ratio", "A cold start's measured TTFT over the one its "
            "placement predicted", ["exec_type"], buckets=RATIO_BUCKETS, registry=r)
        self.fetched = Counter("hydraserve_fetched_bytes", "Bytes the storage agents fetched "
                               "for starting stages", ["server"], registry=r)
        self.fetch_rate = Histogram(
            "hydraserve_fetch_throughput_bytes_per_second", "Achieved throughput of each "
            "stage's fetch", ["server"], buckets=GBPS_BUCKETS, registry=r)
        self.consolidations = Counter("hydraserve_consolidations", "Consolidations by outcome "
                                      "(done, failed, abandoned)", ["model", "outcome"],
                                      registry=r)
        self.consolidation_s = Histogram(
            "hydraserve_consolidation_seconds", "Duration of completed consolidations",
            ["model"], buckets=CONSOLIDATION_BUCKETS, registry=r)
        self.failures = Counter("hydraserve_failures", "Failures by kind (start_failed, "
                                "worker_lost, request_lost, queue_timeout, "
                                "consolidation_failed)", ["kind"], registry=r)
        controller.view.subscribe(self.observe)

    def observe(self, event: str, f: dict) -> None:
        """One event of the control plane (see ControlState.emit)."""
        if event == "cold_start":
            labels = (f["model"], f["exec_type"], str(f["p"]))
            for phase, seconds in (f.get("phases") or {}).items():
                self.phase.labels(*labels, phase).observe(seconds)
            if f.get("ttft_s") is not None:
                self.cold_ttft.labels(*labels).observe(f["ttft_s"])
                if f.get("predicted_ttft_s"):
                    self.ratio.labels(f["exec_type"]).observe(
                        f["ttft_s"] / f["predicted_ttft_s"])
        elif event == "fetch":
            self.fetched.labels(f["server"]).inc(f["bytes"])
            if f["seconds"] > 0:
                self.fetch_rate.labels(f["server"]).observe(f["bytes"] / f["seconds"])
        elif event == "consolidation":
            self.consolidations.labels(f["model"], f["outcome"]).inc()
            if f["outcome"] == "done" and f.get("seconds") is not None:
                self.consolidation_s.labels(f["model"]).observe(f["seconds"])
        elif event == "failure":
            self.failures.labels(f["kind"]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
