"""`hydraserve worker` and `hydraserve runtime`: the processes a cluster backend starts.

The worker's flags are a `WorkerSpec` (what ``protocol.worker_args`` writes) plus what the spec
leaves to the process (`WorkerSetup`: the agent, the bind address and ports); a runtime gets the
same two parts later, from its stdin. Nothing heavy is imported until a command runs.
"""
from __future__ import annotations

import argparse

from hydraserve import lease
from hydraserve.protocol import WorkerSpec
from hydraserve.worker.main import START, WorkerSetup

VLLM_PYTHON_HELP = ("with --engine vllm: a Python that has vLLM (default: HYDRASERVE_VLLM_PYTHON, "
                    "this one, then /opt/vllm-venv/bin/python)")

OMP_SPIN_HELP = ("how long idle OpenMP threads spin before sleeping (sets GOMP_SPINCOUNT before "
                 "torch loads). The default spin (~ms) would make an idle stage steal the cores "
                 "of the stage computing next when stages share a machine; 20000 keeps one "
                 "worker as fast and a pipeline on shared cores ~40%% faster (default: 20000; "
                 "-1 keeps the runtime's default)")


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help="one pipeline stage in its own process (started by a cluster backend)",
        description="Serve one pipeline stage (or a whole model with --pipeline 1). It attaches to "
                    "its node agent's region before importing torch, loads tensors while their "
                    "bytes arrive, joins the stage ring on POST /init, streams tokens from POST "
                    "/generate on the head, and consolidates on POST /consolidate (all-card).")
    _add_stage_arguments(p)
    _add_engine_arguments(p)
    _add_vllm_arguments(p)
    p.add_argument("--omp-spin-count", type=int, default=20000, help=OMP_SPIN_HELP)
    lease.add_arguments(p, "worker")
    p.set_defaults(func=_cmd_worker)


def _add_stage_arguments(p: argparse.ArgumentParser) -> None:
    """Which stage this is, and where it listens."""
    p.add_argument("--model", required=True, help="model name in the remote store")
    p.add_argument("--rank", type=int, default=0, help="this stage's rank (default: 0)")
    p.add_argument("--pipeline", type=int, default=1, dest="p", help="pipeline size p (default: 1)")
    p.add_argument("--layers", required=True,
                   help="decoder layers this stage holds, START:END (from the store's layout)")
    p.add_argument("--all-card", action="store_true",
                   help="memory for the whole model is reserved: this stage can consolidate")
    p.add_argument("--agent", required=True, help="URL of this node's storage agent")
    p.add_argument("--worker-id", default=None, help="name for logs (default: MODEL-rRANK)")
    p.add_argument("--node", default="", help="the server it runs on (reported in /health)")
    p.add_argument("--instance", default="",
                   help="the instance it serves a stage of (reported in /health)")
    p.add_argument("--gpu", type=int, default=0, help="the GPU index of its claim (default: 0)")
    p.add_argument("--claim-gb", type=float, default=0.0,
                   help="the GPU memory its control plane booked for it, in the cluster's GB "
                        "(reported in /health, so a new control plane rebuilds its ledger)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="control API port; 0 = free (default)")
    p.add_argument("--stage-port", type=int, default=0,
                   help="TCP port for the previous stage's connection; 0 = free (default)")


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's shape and the baselines' start and load paths."""
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
    p.add_argument("--size-scale", type=float, default=1.0,
                   help="the cluster's size scale: a byte here counts as this many bytes of "
                        "the paper's (default: 1)")
    p.add_argument("--emulate-profile-s", type=float, default=None, metavar="S",
                   help="a CPU stand-in for a stock vLLM engine on a GPU: sleep S seconds (its "
                        "profiling pass and CUDA-graph capture) after the weights are in, "
                        "stamped 'profiled' in the timeline (default: none)")
    p.add_argument("--emulate-load-gbs", type=float, default=None, metavar="GBS",
                   help="a CPU stand-in for a stock loader on a GPU: pace the copy of the "
                        "arrived weights to at least bytes * size-scale / 1e9 / GBS seconds "
                        "(default: none)")


def _add_vllm_arguments(p: argparse.ArgumentParser) -> None:
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


def spec_from_args(args: argparse.Namespace) -> WorkerSpec:
    """The `WorkerSpec` that ``hydraserve worker``'s flags give (the inverse of worker_args)."""
    try:
        start, end = (int(x) for x in args.layers.split(":"))
    except ValueError:
        raise ValueError(f"--layers must be START:END, not {args.layers!r}") from None
    return WorkerSpec(
        worker_id=args.worker_id or f"{args.model}-r{args.rank}", model=args.model,
        node=args.node, instance=args.instance, gpu=args.gpu, claim_gb=args.claim_gb,
        rank=args.rank, p=args.p, layers=(start, end), all_card=args.all_card,
        num_kv_blocks=args.num_kv_blocks, device=args.device, dtype=args.dtype,
        max_model_len=args.max_model_len, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, threads=args.threads, late_attach=args.late_attach,
        streaming_load=not args.no_streaming_load, gpu_memory_gb=args.gpu_memory_gb,
        engine=args.engine, vllm_python=args.vllm_python, size_scale=args.size_scale,
        profile_s=args.emulate_profile_s, load_gbs=args.emulate_load_gbs)


def setup_from_args(args: argparse.Namespace) -> WorkerSetup:
    return WorkerSetup(agent=args.agent, host=args.host, port=args.port,
                       stage_port=args.stage_port, omp_spin_count=args.omp_spin_count,
                       token=args.cluster_token, lease=lease.from_args(args))


def _cmd_worker(args: argparse.Namespace) -> int:
    if args.engine == "vllm":  # its own flags (the vLLM server's) are not a WorkerSpec's
        from hydraserve.worker.vllm_worker import run

        return run(args, START)
    from hydraserve.worker.main import serve

    return serve(spec_from_args(args), setup_from_args(args))


def add_runtime_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "runtime", help="a pre-started worker runtime (the warm pool of a cluster backend)",
        description="Import torch, the engine and the HTTP stack now (and create the CUDA "
                    "context), print 'runtime ready', then read one line of stdin: a JSON "
                    'object {"spec": a worker spec, "agent": its storage agent\'s URL}, and '
                    "become that worker. A cluster backend keeps a few per server (serve "
                    "--warm-runtime N) so that a cold start does not pay for imports.")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda[:N]: on CUDA the runtime creates its context before it "
                        "waits (default: cpu)")
    p.add_argument("--omp-spin-count", type=int, default=20000,
                   help="as for `hydraserve worker` (default: 20000)")
    p.add_argument("--idle-imports", action="store_true",
                   help="import at the idle CPU priority (Linux SCHED_IDLE), so that a refill "
                        "never slows a cold start in progress; back to normal before waiting")
    lease.add_arguments(p, "runtime (and the worker it becomes)")
    p.set_defaults(func=_cmd_runtime)


def _cmd_runtime(args: argparse.Namespace) -> int:
    from hydraserve.worker.main import run_runtime

    return run_runtime(args.device, args.omp_spin_count, args.idle_imports, args.cluster_token,
                       lease.from_args(args))
