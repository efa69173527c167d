"""The messages between the control plane and its workers, typed (standard library only).

Every worker implementation (ours, the vLLM worker, the simulator's) builds these and every
reader (the controller, the experiment scripts, the tests) parses them, so a field added here
is added everywhere at once. On the wire each is a JSON object; those a worker sends carry
``"protocol": PROTOCOL_VERSION`` and a reader refuses a version it does not know.

  WorkerSpec      control plane -> backend -> worker: what one worker is (its command line)
  RuntimeAssignment backend -> warm runtime (one line of its stdin): become this worker
  Peer            control plane -> worker (POST /init): one stage of the ring
  WorkerHealth    worker -> control plane (GET /health, long-polled with ?wait=EVENT)
  GenerateRequest control plane -> head worker (POST /generate)
  TokenEvent      head worker -> control plane: one token of the stream (ndjson)
  ErrorEvent      head worker -> control plane: the stream ends without its last token
"""
from __future__ import annotations

import enum
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

PROTOCOL_VERSION = 1
RUNTIME_READY = "runtime ready"  # a warm runtime's first line on stdout once it can be adopted
HANDOVER = "the worker is stopping; the stream continues elsewhere"


class ProtocolError(ValueError):
    """A message is malformed or of a protocol version this side does not speak."""


def _check_version(d: dict, what: str) -> None:
    if not isinstance(d, dict):
        raise ProtocolError(f"{what} must be a JSON object, not {type(d).__name__}")
    version = d.get("protocol", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{what} speaks protocol {version}; this side speaks "
                            f"{PROTOCOL_VERSION}")


def _known(cls, d: dict, what: str) -> dict:
    """The fields of ``cls`` found in ``d``, checked for the required ones."""
    if not isinstance(d, dict):
        raise ProtocolError(f"{what} must be a JSON object, not {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    missing = [f.name for f in fields(cls) if f.default is MISSING
               and f.default_factory is MISSING and f.name not in d]
    if missing:
        raise ProtocolError(f"{what} lacks {', '.join(missing)}")
    return {k: v for k, v in d.items() if k in names}


class Phase(str, enum.Enum):
    """Where a worker is in its life."""

    LOADING = "loading"  # started: fetching and loading its weights, starting its engine
    READY = "ready"  # serves (a pipeline stage: once its ring is joined)
    FAILED = "failed"  # gave up; ``error`` says why
    STOPPED = "stopped"  # left in order

    @property
    def final(self) -> bool:
        """Whether the worker will never serve (again)."""
        return self in (Phase.FAILED, Phase.STOPPED)


# start-up and life-cycle events of a worker's timeline, in the order a cold start has them
# ("profiled": the end of an emulated stock-engine profiling pass, `WorkerSpec.profile_s`)
EVENTS = ("spawned", "attached", "imports_done", "http_ready", "connected", "weights_ready",
          "profiled", "engine_ready", "first_token", "consolidation_started", "rest_loaded",
          "consolidated")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a backend needs to start one ``hydraserve worker``; a worker reports it back
    in its health, so a control plane that starts (a restart, a standby taking over) rebuilds
    its instances and its GPU ledger from what runs: ``instance`` (the instance it was started
    for), ``node`` and ``gpu`` (where), ``claim_gb`` (the GPU memory booked for it, in the
    cluster's GB)."""

    worker_id: str
    model: str
    node: str
    rank: int
    p: int
    layers: tuple[int, int]
    all_card: bool
    num_kv_blocks: int
    instance: str = ""
    gpu: int = 0
    claim_gb: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int = 3072
    block_size: int = 16
    max_num_seqs: int = 64
    threads: int | None = None  # torch CPU threads (None: torch's default)
    late_attach: bool = False  # baseline: fetch only once the worker is up
    streaming_load: bool = True  # baseline off: wait for every byte, then load
    gpu_memory_gb: float | None = None  # the claim, in real GB (enforced on CUDA)
    engine: str = "hydraserve"  # or "vllm": the genuine vLLM server (p = 1)
    vllm_python: str | None = None
    # A CPU stand-in for a GPU server (a scaled testbed, `ScaleConfig.emulate_gpu_costs`)
    # emulates two GPU-side costs of a stock vLLM engine that the CPU does not have (None: not
    # emulated): ``profile_s``, its profiling pass and CUDA-graph capture, slept after the
    # weights are in (the timeline's "profiled"); ``load_gbs``, its loader's host -> GPU rate in
    # GB/s of the paper's units: the copy of the arrived checkpoint is paced to take at least
    # bytes * size_scale / 1e9 / load_gbs seconds. ``size_scale``: the cluster's (a byte here
    # counts as size_scale bytes of the paper's).
    size_scale: float = 1.0
    profile_s: float | None = None
    load_gbs: float | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "layers": list(self.layers), "protocol": PROTOCOL_VERSION}

    @classmethod
    def from_json(cls, d: dict) -> WorkerSpec:
        _check_version(d, "a worker spec")
        kw = _known(cls, d, "a worker spec")
        try:
            kw["layers"] = (int(kw["layers"][0]), int(kw["layers"][1]))
        except (TypeError, ValueError, IndexError) as e:
            raise ProtocolError(f"a worker spec's layers must be [start, end]: {e}") from None
        return cls(**kw)


def worker_args(spec: WorkerSpec, agent_url: str) -> list[str]:
    """The ``hydraserve worker`` command line for ``spec`` (every backend starts the same)."""
    args = ["worker", "--model", spec.model, "--rank", str(spec.rank), "--pipeline", str(spec.p),
            "--layers", "%d:%d" % spec.layers, "--agent", agent_url, "--worker-id",
            spec.worker_id, "--node", spec.node, "--instance", spec.instance, "--gpu",
            str(spec.gpu), "--claim-gb", repr(spec.claim_gb),
            "--num-kv-blocks", str(spec.num_kv_blocks), "--device", spec.device,
            "--dtype", spec.dtype, "--block-size", str(spec.block_size), "--max-num-seqs",
            str(spec.max_num_seqs), "--max-model-len", str(spec.max_model_len)]
    if spec.all_card:
        args.append("--all-card")
    if spec.late_attach:
        args.append("--late-attach")
    if not spec.streaming_load:
        args.append("--no-streaming-load")
    if spec.gpu_memory_gb:
        args += ["--gpu-memory-gb", str(spec.gpu_memory_gb)]
    if spec.threads:
        args += ["--threads", str(spec.threads)]
    if spec.size_scale != 1.0:
        args += ["--size-scale", str(spec.size_scale)]
    if spec.profile_s is not None:
        args += ["--emulate-profile-s", str(spec.profile_s)]
    if spec.load_gbs is not None:
        args += ["--emulate-load-gbs", str(spec.load_gbs)]
    if spec.engine != "hydraserve":
        args += ["--engine", spec.engine]
        if spec.vllm_python:
            args += ["--vllm-python", spec.vllm_python]
    return args


@dataclass(frozen=True)
class RuntimeAssignment:
    """What a pre-started runtime (``hydraserve runtime``) is told to become: the worker of
    ``spec``, fed by the storage agent at ``agent``. Sent as one JSON line on its stdin."""

    spec: WorkerSpec
    agent: str

    def to_json(self) -> dict:
        return {"spec": self.spec.to_json(), "agent": self.agent}

    @classmethod
    def from_json(cls, d: dict) -> RuntimeAssignment:
        kw = _known(cls, d, "a runtime assignment")
        if not isinstance(kw["agent"], str):
            raise ProtocolError("a runtime assignment's agent must be a URL")
        return cls(WorkerSpec.from_json(kw["spec"]), kw["agent"])


@dataclass(frozen=True)
class Peer:
    """One stage of a pipeline's ring, as every stage is told at /init."""

    rank: int
    host: str
    stage_port: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Peer:
        kw = _known(cls, d, "a peer")
        try:
            return cls(int(kw["rank"]), str(kw["host"]), int(kw["stage_port"]))
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"a peer's rank and stage_port must be integers: {e}") from None


@dataclass
class WorkerHealth:
    """What a worker reports about itself. ``timeline``: wall-clock stamps of `EVENTS`;
    the load fields are those of an engine that runs sequences (the head or a standalone
    worker); ``extra``: what one implementation adds (its pid, the vLLM server's URL, ...)."""

    phase: Phase
    worker_id: str = ""
    error: str | None = None
    stage_port: int = 0
    standalone: bool = False
    timeline: dict[str, float] = field(default_factory=dict)
    spec: WorkerSpec | None = None  # what it was started as (None: an older worker)
    running: int = 0  # sequences in the engine
    waiting: int = 0
    steps: int = 0  # engine steps launched
    aborted: int = 0  # sequences aborted (their client went away)
    kv_blocks: int | None = None
    kv_blocks_free: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def has(self, event: str) -> bool:
        return event in self.timeline

    @property
    def ended(self) -> bool:
        """Whether it will never serve (again)."""
        return self.phase.final

    def settled(self, event: str) -> bool:
        """Whether a wait for ``event`` is over: it happened, or it will not (the worker ended,
        or reports an error)."""
        return self.has(event) or self.ended or self.error is not None

    def to_json(self) -> dict:
        out = {k: v for k, v in self.extra.items()}
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        out["phase"] = self.phase.value
        out["timeline"] = dict(self.timeline)
        out["spec"] = None if self.spec is None else self.spec.to_json()
        out["protocol"] = PROTOCOL_VERSION
        return out

    @classmethod
    def from_json(cls, d: dict) -> WorkerHealth:
        _check_version(d, "a worker's health")
        kw = _known(cls, d, "a worker's health")
        try:
            kw["phase"] = Phase(kw["phase"])
        except ValueError:
            raise ProtocolError(f"unknown worker phase {kw['phase']!r}") from None
        if kw.get("spec") is not None:
            kw["spec"] = WorkerSpec.from_json(kw["spec"])
        names = {f.name for f in fields(cls)}
        kw["extra"] = {k: v for k, v in d.items() if k not in names and k != "protocol"}
        return cls(**kw)


@dataclass
class GenerateRequest:
    """One sequence for a head worker. ``output_ids``: tokens the request already produced on
    a lost worker; generation continues after them (a resumed stream). ``params``: the
    sampling parameters as the worker's engine takes them (engine.sequence.SamplingParams:
    max_tokens, temperature, top_p, top_k, seed, ignore_eos, stop_token_ids, choice,
    min_tokens, presence_penalty, frequency_penalty, repetition_penalty, logit_bias as
    {"token id": bias}, logprobs, prompt_logprobs)."""

    prompt_ids: list[int]
    params: dict[str, Any] = field(default_factory=dict)
    output_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {**self.params, "prompt_ids": list(self.prompt_ids)}
        if self.output_ids:
            out["output_ids"] = list(self.output_ids)
        return out

    @classmethod
    def from_json(cls, d: dict) -> GenerateRequest:
        if not isinstance(d, dict):
            raise ProtocolError("a generate request must be a JSON object")
        try:
            prompt = [int(t) for t in d["prompt_ids"]]
            output = [int(t) for t in d.get("output_ids") or ()]
        except KeyError:
            raise ProtocolError("a generate request lacks prompt_ids") from None
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"token ids must be integers: {e}") from None
        params = {k: v for k, v in d.items() if k not in ("prompt_ids", "output_ids", "protocol")}
        return cls(prompt, params, output)


@dataclass(frozen=True)
class TokenEvent:
    """One token of a stream; ``finish_reason`` ("stop", "length") on the last one. An engine
    may end a stream with no token (``token_id`` None) and a finish reason.

    Asked for with the ``logprobs`` param (k): ``logprob``, the token's log-probability under
    the model's raw distribution, and ``top_logprobs``, the k most likely [token_id, logprob]
    pairs, highest first. Asked for with ``prompt_logprobs`` (k), on the first token only:
    ``prompt_logprobs``, one entry per prompt token: None for the first, then
    [logprob, top k pairs]."""

    token_id: int | None
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list | None = None
    prompt_logprobs: list | None = None

    def to_json(self) -> dict:
        out = {"token_id": self.token_id, "finish_reason": self.finish_reason}
        for name in ("logprob", "top_logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True)
class ErrorEvent:
    """The stream ends without its last token. ``status`` 400: the request itself is at fault
    (the worker is fine); ``handover``: the worker is leaving in order and the stream should
    continue elsewhere from the tokens it has; otherwise the worker failed."""

    error: str
    status: int | None = None
    handover: bool = False

    def to_json(self) -> dict:
        out: dict[str, Any] = {"error": self.error}
        if self.status is not None:
            out["status"] = self.status
        if self.handover:
            out["handover"] = True
        return out


def parse_event(d: dict) -> TokenEvent | ErrorEvent:
    """One item of a /generate stream."""
    if not isinstance(d, dict):
        raise ProtocolError("a stream item must be a JSON object")
    if "error" in d:
        return ErrorEvent(str(d["error"]), d.get("status"), bool(d.get("handover")))
    tid = d.get("token_id")
    try:
        lp = d.get("logprob")
        return TokenEvent(None if tid is None else int(tid), d.get("finish_reason"),
                          None if lp is None else float(lp), d.get("top_logprobs"),
                          d.get("prompt_logprobs"))
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"a token item's token_id must be an integer: {e}") from None
