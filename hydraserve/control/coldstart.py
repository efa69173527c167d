"""Where a cold start's seconds went: one record per instance started, its stages' traces, and
the critical-path phases of the time to its first token.

A cold start overlaps its steps (that is the point: the fetch runs while the runtime imports and
the engine starts), so its phases are not the steps' durations but what each step added to the
wait: phase k ends at max(the end of phase k-1, the moment step k was done). They follow each
other without gaps from the arrival of the request the instance was started for to its first
token, so they add up to that request's TTFT. The steps, in the order a cold start has them:

  queue        the request waits for the scale-up decision (a slot, room in the cluster)
  placement    the placement is decided and each stage's prefetch ordered
  spawn        the backend starts the workers (container or process)
  imports      each worker's runtime imports (torch, the engine)
  server       each worker's control API serves
  ring         the stages are joined into a pipeline
  fetch        the weights arrive in each server's host memory (the agent's fetch)
  load         the weights are loaded (streamed, as they arrive)
  engine       the engine starts (its KV cache, the scheduler)
  first_token  the prefill and the first token

(A start path whose workers start only once the whole checkpoint is in host memory, as
ServerlessLLM's, has its fetch right after the placement.)

Times are on the control plane's clock; a worker's own timeline is read relative to its
"spawned" stamp and placed at the moment the control plane ordered that worker.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

PHASES = ("queue", "placement", "spawn", "imports", "server", "ring", "fetch", "load", "engine",
          "first_token")


def _latest(values) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


@dataclass
class StageTrace:
    rank: int
    node: str
    gpu: int | None
    all_card: bool = False
    ordered: float | None = None  # its worker was ordered (start_worker)
    serving: float | None = None  # its control API answered
    worker: dict[str, float] = field(default_factory=dict)  # seconds after its "spawned"
    fetch_bytes: int | None = None  # what its agent fetched (None: no fetch, or unknown)
    fetch_s: float | None = None

    def at(self, event: str) -> float | None:
        """When ``event`` of its worker's timeline happened, on the control plane's clock."""
        if self.ordered is None or event not in self.worker:
            return None
        return self.ordered + self.worker[event]

    def read_timeline(self, timeline: dict[str, float]) -> None:
        base = timeline.get("spawned")
        if base is not None:
            self.worker = {k: round(v - base, 6) for k, v in timeline.items()}

    @property
    def fetch_gbps(self) -> float | None:
        if not self.fetch_bytes or not self.fetch_s:
            return None
        return self.fetch_bytes * 8 / 1e9 / self.fetch_s


@dataclass
class ColdStart:
    id: str
    model: str
    exec_type: str
    p: int
    policy: str
    predicted_ttft_s: float | None
    from_cache: bool
    created: float
    stages: list[StageTrace]
    arrival: float | None = None  # the request it was started for
    # the instance's own timeline (seconds after ``created``), shared: it grows as it goes
    timeline: dict[str, float] = field(default_factory=dict)
    state: str = "starting"  # starting, serving, failed
    error: str | None = None

    @property
    def marks(self) -> dict[str, float]:
        """The control plane's events of this start, on its clock."""
        return {k: self.created + v for k, v in self.timeline.items()}

    def stage(self, rank: int) -> StageTrace | None:
        return next((s for s in self.stages if s.rank == rank), None)

    @property
    def start(self) -> float:
        return self.arrival if self.arrival is not None else self.created

    def steps(self) -> list[tuple[str, float | None]]:
        """When each step of `PHASES` was done (None: not known, or not part of this start)."""
        m, st = self.marks, self.stages
        pre = m.get("prefetch_started")
        fetched = None
        if pre is not None and not self.from_cache:
            fetched = _latest(pre + s.fetch_s if s.fetch_s is not None else None for s in st)
        steps = [("queue", self.created),
                 ("placement", pre if pre is not None else m.get("workers_spawned")),
                 ("spawn", m.get("workers_spawned")),
                 ("imports", _latest(s.at("imports_done") for s in st)),
                 ("server", _latest(s.serving for s in st)),
                 ("ring", m.get("ready")),
                 ("fetch", fetched),
                 ("load", _latest(s.at("weights_ready") for s in st)),
                 ("engine", st[0].at("engine_ready") if st else None),
                 ("first_token", m.get("first_token"))]
        if "fetched" in m:  # a start path that waits for the whole fetch before its workers
            steps.remove(("fetch", fetched))
            steps.insert(2, ("fetch", m["fetched"]))
        return steps

    def phases(self) -> dict[str, float] | None:
        """Seconds each phase added to the TTFT (they sum to `ttft`); None before the first
        token."""
        end = self.marks.get("first_token")
        if end is None:
            return None
        t, out = self.start, {}
        for name, at in self.steps():
            done = t if at is None else min(max(t, at), end)
            out[name] = round(done - t, 6)
            t = done
        out["first_token"] = round(out["first_token"] + end - t, 6)
        return {k: out[k] for k in PHASES}

    @property
    def ttft(self) -> float | None:
        end = self.marks.get("first_token")
        return None if end is None else end - self.start

    def segments(self, s: StageTrace) -> list[dict]:
        """One stage's row of the timeline: [{"name", "start", "end"}] in seconds after the
        start (the request's arrival); overlapping, as they ran."""
        m, t0 = self.marks, self.start
        pre = m.get("prefetch_started")
        spans = [("imports", s.ordered, s.at("imports_done")),
                 ("server", s.at("imports_done"), s.serving),
                 ("fetch", pre, None if pre is None or s.fetch_s is None else pre + s.fetch_s),
                 ("load", s.at("attached"), s.at("weights_ready")),
                 ("engine", s.at("weights_ready"), s.at("engine_ready"))]
        if s.all_card:
            spans.append(("consolidation", m.get("consolidation_started"), m.get("consolidated")))
        if s.rank == 0:
            spans.append(("first_token", _latest([s.at("engine_ready"), m.get("ready")]),
                          m.get("first_token")))
        return [{"name": n, "start": round(a - t0, 4), "end": round(b - t0, 4)}
                for n, a, b in spans if a is not None and b is not None and b >= a]

    def to_json(self) -> dict:
        phases = self.phases()
        return {
            "id": self.id, "model": self.model, "exec_type": self.exec_type, "p": self.p,
            "policy": self.policy, "from_cache": self.from_cache, "state": self.state,
            "error": self.error, "predicted_ttft_s": self.predicted_ttft_s,
            "ttft_s": None if self.ttft is None else round(self.ttft, 4), "phases": phases,
            "marks": {k: round(v - self.start, 4) for k, v in self.marks.items()},
            "stages": [{"rank": s.rank, "node": s.node, "gpu": s.gpu, "all_card": s.all_card,
                        "fetch_bytes": s.fetch_bytes,
                        "fetch_gbps": None if s.fetch_gbps is None else round(s.fetch_gbps, 3),
                        "segments": self.segments(s)} for s in self.stages]}


class ColdStarts:
    """The records of the latest cold starts (at most ``keep``), by instance id."""

    def __init__(self, keep: int = 64):
        self.keep = keep
        self._by_id: OrderedDict[str, ColdStart] = OrderedDict()

    def add(self, record: ColdStart) -> ColdStart:
        self._by_id[record.id] = record
        while len(self._by_id) > self.keep:
            self._by_id.popitem(last=False)
        return record

    def get(self, iid: str) -> ColdStart | None:
        return self._by_id.get(iid)

    def recent(self, n: int | None = None) -> list[ColdStart]:
        """The latest first."""
        out = list(reversed(self._by_id.values()))
        return out if n is None else out[:n]
