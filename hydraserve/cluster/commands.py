"""`hydraserve generate`: one completion, in this process (the engine, optionally as P stages)
or on a pipeline of P worker processes with their own store and agents (`cluster.pipeline`,
the cold-start path)."""
from __future__ import annotations

import argparse
import json
import logging
import time

log = logging.getLogger("hydraserve")


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
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
    from hydraserve.engine.engine import LLMEngine  # noqa: F401 - torch, before the clock starts
    from hydraserve.engine.sequence import SamplingParams
    from hydraserve.tokenizer import Tokenizer

    t0 = time.monotonic()
    # --prompt-ids with --json needs no tokenizer (a model folder may have none)
    tok = Tokenizer.from_dir(args.model) if args.prompt is not None or not args.json else None
    prompt = _prompt(args, tok)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    cfg = EngineConfig(device=args.device, dtype=args.dtype, kv_cache_mb=args.kv_cache_mb)
    if args.processes:
        out = _generate_processes(args, prompt, params, cfg)
    else:
        out = _generate_here(args, prompt, params, cfg, t0)
    text = tok.decode(out["token_ids"]) if tok else ""
    if args.json:
        print(json.dumps({"token_ids": out.pop("token_ids"), "text": text,
                          "pipeline": args.pipeline, **out}))
    else:
        print(text)
    return 0


def _prompt(args: argparse.Namespace, tok) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise SystemExit("error: --prompt-ids must be comma-separated integers") from None
    if args.chat:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    return tok.encode(args.prompt)


def _generate_here(args: argparse.Namespace, prompt: list[int], params, cfg, t0: float) -> dict:
    """In this process: the engine, its P stages handing hidden states on in memory."""
    from hydraserve.engine.engine import LLMEngine

    if args.consolidate_after is not None or args.nic_gbps is not None:
        raise ValueError("--consolidate-after and --nic-gbps need --processes")
    engine = LLMEngine(args.model, cfg, pipeline=args.pipeline)
    t_load = time.monotonic()
    result = engine.generate([prompt], params)[0]
    log.info("loaded %d stage(s) in %.2f s; %d prompt + %d new tokens in %.2f s (%s)",
             engine.pipeline, t_load - t0, len(prompt), len(result.token_ids),
             time.monotonic() - t_load, result.finish_reason.value)
    return {"token_ids": result.token_ids, "finish_reason": result.finish_reason.value}


def _generate_processes(args: argparse.Namespace, prompt: list[int], params, cfg) -> dict:
    """On P worker processes, consolidated after --consolidate-after tokens."""
    from dataclasses import asdict

    from hydraserve.cluster.pipeline import GroupConfig, LocalPipeline

    body = {k: v for k, v in asdict(params).items() if v is not None}
    group = GroupConfig(args.model, p=args.pipeline, nic_gbps=args.nic_gbps, engine=cfg,
                        token=args.cluster_token)
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
