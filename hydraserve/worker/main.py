"""``hydraserve worker``: the process every cluster backend starts, one per pipeline stage.

Fast start, in this order: attach to the node agent's region (standard library only: the fetch
was ordered before this process existed and keeps running), import torch and the engine, start
loading tensors as their bytes arrive (a thread), and only then import the HTTP stack and serve
the control API, so imports, fetch and copies overlap.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

START = time.time()

VLLM_PYTHON_HELP = ("with --engine vllm: a Python that has vLLM (default: HYDRASERVE_VLLM_PYTHON, "
                    "this one, then /opt/vllm-venv/bin/python)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name in the remote store")
    p.add_argument("--rank", type=int, default=0, help="this stage's rank (default: 0)")
    p.add_argument("--pipeline", type=int, default=1, dest="p", help="pipeline size p (default: 1)")
    p.add_argument("--layers", required=True,
                   help="decoder layers this stage holds, START:END (from the store's layout)")
    p.add_argument("--all-card", action="store_true",
                   help="memory for the whole model is reserved: this stage can consolidate")
    p.add_argument("--agent", required=True, help="URL of this node's storage agent")
    p.add_argument("--worker-id", default=None, help="name for logs (default: MODEL-rRANK)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="control API port; 0 = free (default)")
    p.add_argument("--stage-port", type=int, default=0,
                   help="TCP port for the previous stage's connection; 0 = free (default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--num-kv-blocks", type=int, required=True,
                   help="KV cache blocks; the same on every stage of a pipeline")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="running sequences (default: 64)")
    p.add_argument("--max-model-len", type=int, default=3072, help="default: 3072")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="on CUDA, cap this process's GPU memory to its claim (a per-process "
                        "memory fraction) so that workers sharing a GPU stay in budget")
    p.add_argument("--late-attach", action="store_true",
                   help="baseline start path: import torch first, only then attach (and so start "
                        "the fetch when no prefetch was ordered)")
    p.add_argument("--no-streaming-load", action="store_true",
                   help="baseline load path: wait for every byte of the stage, then load")
    p.add_argument("--engine", choices=["hydraserve", "vllm"], default="hydraserve",
                   help="hydraserve (default): our engine; vllm: fetch the whole model to the "
                        "node's disk through the same storage path, then run the genuine vLLM "
                        "OpenAI server on it (p = 1 only; the real Serverless vLLM baseline)")
    p.add_argument("--vllm-python", default=None, help=VLLM_PYTHON_HELP)
    # vLLM's default start on CPU compiles the model; vLLM 0.32's compile cache does not load
    # back on the CPU build (a recompile on every start, ~1 min), so the peer runs eager
    p.add_argument("--vllm-args", default="--enforce-eager",
                   help="with --engine vllm: extra arguments for vLLM's server (default: "
                        "--enforce-eager; pass '' for vLLM's defaults, which compile the model)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0,
                   help="with --engine vllm: VLLM_CPU_KVCACHE_SPACE in GB (default: 1)")
    p.add_argument("--vllm-start-timeout", type=float, default=600.0,
                   help="with --engine vllm: seconds vLLM may take to serve (default: 600)")
    p.add_argument("--omp-spin-count", type=int, default=20000,
                   help="how long idle OpenMP threads spin before sleeping (sets GOMP_SPINCOUNT "
                        "before torch loads). The default spin (~ms) would make an idle stage "
                        "steal the cores of the stage computing next when stages share a "
                        "machine; 20000 keeps one worker as fast and a pipeline on shared cores "
                        "~40%% faster (default: 20000; -1 keeps the runtime's default)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda[:N]: on CUDA the runtime creates its context before it "
                        "waits (default: cpu)")
    p.add_argument("--omp-spin-count", type=int, default=20000,
                   help="as for `hydraserve worker` (default: 20000)")
    p.add_argument("--idle-imports", action="store_true",
                   help="import at the idle CPU priority (Linux SCHED_IDLE), so that a refill "
                        "never slows a cold start in progress; back to normal before waiting")


from hydraserve.protocol import RUNTIME_READY  # noqa: E402


def run_runtime(args: argparse.Namespace) -> int:
    """A pre-started worker runtime: import torch, the engine and the HTTP stack (and create
    the CUDA context) now, then wait for one assignment, a JSON list of `hydraserve worker`
    arguments on one line of stdin, and become that worker. Nothing forks: the runtime is the
    process that serves."""
    import json

    log = logging.getLogger("hydraserve.worker")
    idle = args.idle_imports and hasattr(os, "sched_setscheduler")
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    t0 = time.time()
    if args.omp_spin_count >= 0:
        os.environ["GOMP_SPINCOUNT"] = str(args.omp_spin_count)
    import torch

    import hydraserve.engine.engine  # noqa: F401 - everything a worker imports, imported now
    import hydraserve.store.server  # noqa: F401
    import hydraserve.worker.api  # noqa: F401
    import hydraserve.worker.core  # noqa: F401

    if args.device.startswith("cuda") and torch.cuda.is_available():
        torch.zeros(1, device=args.device)  # the context, which takes seconds on a GPU
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
    p = argparse.ArgumentParser(prog="hydraserve worker")
    add_arguments(p)
    wargs = p.parse_args(json.loads(line)[1:])  # the list starts with "worker"
    if wargs.device != args.device or wargs.engine != "hydraserve":
        log.error("runtime for %s cannot become a worker on %s with engine %s", args.device,
                  wargs.device, wargs.engine)
        return 2
    wargs.cluster_token = getattr(args, "cluster_token", None)
    log.info("runtime pid %d: adopted as worker %s", os.getpid(), wargs.worker_id)
    return run(wargs, adopted)


def run(args: argparse.Namespace, start: float | None = None) -> int:
    """Serve as the worker ``args`` describes; ``start``: when it was asked to (default: when
    this process started)."""
    start = START if start is None else start
    from hydraserve.httpjson import use_token

    token = getattr(args, "cluster_token", None)
    use_token(token)  # the calls to the agent carry it
    if args.engine == "vllm":
        from hydraserve.worker.vllm_worker import run as run_vllm

        return run_vllm(args, start)
    from hydraserve.store.image import ImageKind, ImageSpec
    from hydraserve.store.progressive import ProgressiveRegion
    from hydraserve.worker.timeline import Timeline

    wid = args.worker_id or f"{args.model}-r{args.rank}"
    timeline = Timeline(wid, start)
    # a whole model is a full image: the one an agent can keep in its cache
    spec = ImageSpec(args.model, ImageKind.FULL) if args.p == 1 else \
        ImageSpec(args.model, ImageKind.STAGE, args.p, args.rank)
    region = None
    if not args.late_attach:
        region = ProgressiveRegion.attach(args.agent, spec)
        timeline.mark("attached")

    if args.omp_spin_count >= 0:
        os.environ["GOMP_SPINCOUNT"] = str(args.omp_spin_count)
    import torch  # noqa: F401 - the heavy import, overlapping the fetch

    from hydraserve.engine.config import EngineConfig
    from hydraserve.worker.core import Worker, WorkerConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_memory_gb and args.device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(args.device)
        total = torch.cuda.get_device_properties(dev).total_memory / 1e9
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gb / total), dev)
    timeline.mark("imports_done")
    if region is None:
        region = ProgressiveRegion.attach(args.agent, spec)
        timeline.mark("attached")
    start, end = (int(x) for x in args.layers.split(":"))
    engine = EngineConfig(device=args.device, dtype=args.dtype, block_size=args.block_size,
                          num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len)
    cfg = WorkerConfig(worker_id=wid, model=args.model, rank=args.rank, p=args.p,
                       layers=(start, end), all_card=args.all_card, agent=args.agent,
                       engine=engine, host=args.host, stage_port=args.stage_port,
                       streaming_load=not args.no_streaming_load)
    worker = Worker(cfg, region, timeline)
    worker.start_loading()

    from hydraserve.store.server import run_until
    from hydraserve.worker.api import make_app

    app = make_app(worker)
    timeline.mark("http_ready")
    try:
        run_until(app, args.host, args.port, f"hydraserve worker {wid}", worker.exit_requested,
                  extra=f" stage_port={worker.stage_port}", token=token,
                  cancel_on_disconnect=True)
    finally:
        worker.stop()
    logging.getLogger("hydraserve.worker").info("worker %s: exited", wid)
    # Everything is released by now. Leave without the interpreter's teardown: a daemon thread
    # still inside a torch call when the runtime is finalized makes C++ abort ("terminate
    # called without an active exception", exit -6), about one SIGTERM in five here.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
