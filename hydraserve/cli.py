"""The ``hydraserve`` command: the parser of every subcommand, and the one place that reads the
environment. Each package registers its own subcommands (``*/commands.py``) and imports its
heavy parts only when one runs, so ``hydraserve --help`` starts in a fraction of a second and
never imports torch.

Environment variables (read here only, then passed down as arguments):
  HYDRASERVE_LOG_LEVEL    logging level for every subcommand (default INFO)
  HYDRASERVE_ADMIN_TOKEN  serve: the admin API's bearer token when --admin-token is not given
  HYDRASERVE_CACHE        serve: where the default model is converted to (default ~/.cache/hydraserve)
  HYDRASERVE_CLUSTER_TOKEN serve, store, worker: the optional shared secret of the store's, the
                          agents' and the workers' APIs (sent and checked when set)
  HYDRASERVE_VLLM_PYTHON  serve, worker --engine vllm: the Python with vLLM, when --vllm-python
                          is not given
  KUBECONFIG              serve --cluster-backend kubernetes: the kubeconfig, when --kubeconfig
                          is not given
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from hydraserve.gateway.commands import DEFAULT_TTFT_SLO_S  # noqa: F401 - the benchmarks' SLO

log = logging.getLogger("hydraserve")

CLUSTER_TOKEN_ENV = "HYDRASERVE_CLUSTER_TOKEN"  # the optional secret of the internal APIs
CACHE_ENV = "HYDRASERVE_CACHE"
# options whose default a variable gives: an option a command has and was not given takes it
OPTION_VARIABLES = {"admin_token": "HYDRASERVE_ADMIN_TOKEN", "kubeconfig": "KUBECONFIG",
                    "vllm_python": "HYDRASERVE_VLLM_PYTHON"}


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
    from hydraserve.cluster.commands import add_generate_parser
    from hydraserve.gateway.commands import add_serve_parser
    from hydraserve.sim.commands import add_sim_parser
    from hydraserve.store.commands import add_store_parser
    from hydraserve.worker.commands import add_runtime_parser, add_worker_parser

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
    add_generate_parser(sub)
    add_store_parser(sub)
    add_worker_parser(sub)
    add_runtime_parser(sub)
    add_serve_parser(sub)
    _add_workload(sub)
    add_sim_parser(sub)
    return parser


def _cache_root(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(CACHE_ENV) or Path.home() / ".cache" / "hydraserve")


def read_environment(args: argparse.Namespace,
                     environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    """Add what the environment says to ``args``: ``cluster_token`` (None: no token),
    ``cache_root``, and each option of `OPTION_VARIABLES` the command has but was not given."""
    args.cluster_token = environ.get(CLUSTER_TOKEN_ENV) or None
    args.cache_root = _cache_root(environ)
    for option, variable in OPTION_VARIABLES.items():
        if getattr(args, option, "") is None:  # "": the command has no such option
            setattr(args, option, environ.get(variable) or None)
    return args


def _default_model() -> str:
    """The folder of `serve`'s default model, converted into the cache if it is not there yet
    (the benchmarks serve it too)."""
    from hydraserve.gateway.commands import default_model

    return default_model(_cache_root(os.environ))


def main(argv: list[str] | None = None) -> int:
    args = read_environment(build_parser().parse_args(argv))
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
