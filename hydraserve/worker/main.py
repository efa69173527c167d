"""The process every cluster backend starts, one per pipeline stage: ``hydraserve worker`` (its
flags give a `WorkerSpec`) or a warm ``hydraserve runtime`` that is assigned one later. Both end
in `serve`.

Fast start, in this order: attach to the node agent's region (standard library only: the fetch
was ordered before this process existed and keeps running), import torch and the engine, start
loading tensors as their bytes arrive (a thread), and only then import the HTTP stack and serve
the control API, so imports, fetch and copies overlap.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydraserve.lease import Lease
from hydraserve.protocol import RUNTIME_READY, RuntimeAssignment, WorkerSpec

if TYPE_CHECKING:
    from hydraserve.store.progressive import ProgressiveRegion
    from hydraserve.worker.core import Worker
    from hydraserve.worker.timeline import Timeline

START = time.time()

log = logging.getLogger("hydraserve.worker")


@dataclass(frozen=True)
class WorkerSetup:
    """How this process serves its `WorkerSpec`: what the spec leaves to the process."""

    agent: str  # URL of this node's storage agent
    host: str = "127.0.0.1"  # bind address of the control API
    port: int = 0  # control API port; 0: a free one
    stage_port: int = 0  # the previous stage's connection; 0: a free one
    omp_spin_count: int = 20000  # GOMP_SPINCOUNT before torch loads; -1: the runtime's default
    token: str | None = None  # the cluster token: checked on the control API, sent to the agent
    lease: Lease | None = None  # exit once the control plane stops renewing it (hydraserve.lease)


def _set_omp_spin(count: int) -> None:
    if count >= 0:
        os.environ["GOMP_SPINCOUNT"] = str(count)  # read by OpenMP when torch loads


def run_runtime(device: str, omp_spin_count: int, idle_imports: bool,
                token: str | None, lease: Lease | None = None) -> int:
    """A pre-started worker runtime: import torch, the engine and the HTTP stack (and create
    the CUDA context) now, then wait for one `RuntimeAssignment` on one line of stdin and become
    that worker. Nothing forks: the runtime is the process that serves. An idle runtime leaves
    when its stdin closes (its control plane is gone); the worker it becomes holds ``lease``."""
    idle = idle_imports and hasattr(os, "sched_setscheduler")
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    t0 = time.time()
    _set_omp_spin(omp_spin_count)
    _import_worker(device)
    if idle:
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except PermissionError:
            log.warning("runtime: cannot leave SCHED_IDLE (not permitted): the worker it becomes "
                        "runs at idle priority")
    log.info("runtime pid %d: imports done in %.2f s; waiting for an assignment", os.getpid(),
             time.time() - t0)
    print(f"{RUNTIME_READY} pid={os.getpid()}", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        log.info("runtime pid %d: no assignment (stdin closed); exiting", os.getpid())
        return 0
    adopted = time.time()
    try:
        job = RuntimeAssignment.from_json(json.loads(line))
    except ValueError as e:  # not JSON, or not an assignment (a ProtocolError)
        log.error("runtime pid %d: a malformed assignment: %s", os.getpid(), e)
        return 2
    if job.spec.device != device or job.spec.engine != "hydraserve":
        log.error("runtime for %s cannot become a worker on %s with engine %s", device,
                  job.spec.device, job.spec.engine)
        return 2
    log.info("runtime pid %d: adopted as worker %s", os.getpid(), job.spec.worker_id)
    setup = WorkerSetup(agent=job.agent, omp_spin_count=omp_spin_count, token=token, lease=lease)
    return serve(job.spec, setup, adopted)


def _import_worker(device: str) -> None:
    """Everything a worker imports, imported now (and on CUDA the context, which takes
    seconds on a GPU)."""
    import torch

    import hydraserve.engine.engine  # noqa: F401
    import hydraserve.store.server  # noqa: F401
    import hydraserve.worker.api  # noqa: F401
    import hydraserve.worker.core  # noqa: F401

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.zeros(1, device=device)


def serve(spec: WorkerSpec, setup: WorkerSetup, start: float | None = None) -> int:
    """Serve as the worker of ``spec`` with our engine; ``start``: when it was asked to
    (default: when this process started)."""
    start = START if start is None else start
    from hydraserve.store.image import ImageKind, ImageSpec
    from hydraserve.store.progressive import ProgressiveRegion
    from hydraserve.worker.timeline import Timeline

    timeline = Timeline(spec.worker_id, start)
    # a whole model is a full image: the one an agent can keep in its cache
    image = ImageSpec(spec.model, ImageKind.FULL) if spec.p == 1 else \
        ImageSpec(spec.model, ImageKind.STAGE, spec.p, spec.rank)
    region = None
    if not spec.late_attach:
        region = ProgressiveRegion.attach(setup.agent, image, token=setup.token)
        timeline.mark("attached")

    _set_omp_spin(setup.omp_spin_count)
    _import_engine(spec)  # the heavy imports, overlapping the fetch
    timeline.mark("imports_done")
    if region is None:
        region = ProgressiveRegion.attach(setup.agent, image, token=setup.token)
        timeline.mark("attached")
    worker = _start_worker(spec, setup, region, timeline)

    from hydraserve.store.server import run_until
    from hydraserve.worker.api import make_app

    app = make_app(worker)
    timeline.mark("http_ready")
    try:
        run_until(app, setup.host, setup.port, f"hydraserve worker {spec.worker_id}",
                  worker.exit_requested, extra=f" stage_port={worker.stage_port}",
                  token=setup.token, cancel_on_disconnect=True, lease=setup.lease)
    finally:
        worker.stop()
    log.info("worker %s: exited", spec.worker_id)
    # Everything is released by now. Leave without the interpreter's teardown: a daemon thread
    # still inside a torch call when the runtime is finalized makes C++ abort ("terminate
    # called without an active exception", exit -6), about one SIGTERM in five here.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _import_engine(spec: WorkerSpec) -> None:
    """Import torch and the engine; set this worker's thread count and, on CUDA, its memory
    cap."""
    import torch

    import hydraserve.engine.config  # noqa: F401
    import hydraserve.worker.core  # noqa: F401

    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.gpu_memory_gb and spec.device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(spec.device)
        total = torch.cuda.get_device_properties(dev).total_memory / 1e9
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.gpu_memory_gb / total), dev)


def _start_worker(spec: WorkerSpec, setup: WorkerSetup, region: ProgressiveRegion,
                  timeline: Timeline) -> Worker:
    """The engine side of the worker, loading from ``region`` (a thread) as bytes arrive."""
    from hydraserve.engine.config import EngineConfig
    from hydraserve.worker.core import Worker, WorkerConfig
    from hydraserve.worker.emulation import GpuEmulation

    engine = EngineConfig(device=spec.device, dtype=spec.dtype, block_size=spec.block_size,
                          num_kv_blocks=spec.num_kv_blocks, max_num_seqs=spec.max_num_seqs,
                          max_model_len=spec.max_model_len)
    cfg = WorkerConfig(worker_id=spec.worker_id, model=spec.model, rank=spec.rank, p=spec.p,
                       layers=spec.layers, all_card=spec.all_card, agent=setup.agent,
                       engine=engine, host=setup.host, stage_port=setup.stage_port,
                       streaming_load=spec.streaming_load, token=setup.token,
                       emulation=GpuEmulation.of(spec), started_as=spec)
    worker = Worker(cfg, region, timeline)
    worker.start_loading()
    return worker
