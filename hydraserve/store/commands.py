"""`hydraserve store serve` and `hydraserve store agent`: the two servers of the fetch path."""
from __future__ import annotations

import argparse
import logging

from hydraserve import lease

log = logging.getLogger("hydraserve")


def add_store_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "store", help="run the remote model store or a node storage agent",
        description="The fetch path of a cold start. The remote store serves any pipeline "
                    "stage's weights (a safetensors-format image) with HTTP range requests under "
                    "an egress limit. A storage agent runs on each server: on a prefetch order it "
                    "pulls an image into shared memory over parallel connections under the "
                    "server's NIC limit, and workers load tensors from it while bytes arrive.")
    ssub = p.add_subparsers(dest="store_command", metavar="SERVER", required=True)
    _add_serve(ssub)
    _add_agent(ssub)


def _bind_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default: 0)")


def _add_serve(ssub: argparse._SubParsersAction) -> None:
    s = ssub.add_parser(
        "serve", help="the remote model store",
        description="Serve every Hugging Face safetensors model under --root. "
                    "GET /models, /models/NAME/layout?p=P, /models/NAME/image?kind=stage|rest|full"
                    "&p=P&rank=R (Range requests; HEAD gives the size). Images are streamed from "
                    "the checkpoint files, never built in memory.")
    s.add_argument("--root", required=True, help="folder whose subfolders are model directories")
    _bind_arguments(s)
    s.add_argument("--egress-gbps", type=float, default=None,
                   help="total egress limit shared fairly by all connections (default: none)")
    lease.add_arguments(s, "store")
    s.add_argument("--orphan-cleanup", default=None, metavar="DIR",
                   help="with a lease: the folder of the cluster it belongs to, removed when it "
                        "exits as an orphan (nothing is left behind); default: none")
    s.set_defaults(func=_cmd_serve)


def _add_agent(ssub: argparse._SubParsersAction) -> None:
    a = ssub.add_parser(
        "agent", help="a node storage agent",
        description="Pull images from the remote store into shared memory on prefetch orders. "
                    "POST /prefetch and /attach with {model, kind, p, rank}; POST /release "
                    "{id}; GET /regions, /cache. A region's first 8 bytes count the contiguous "
                    "image bytes received. Every segment is removed on exit (SIGINT/SIGTERM too).")
    a.add_argument("--node", required=True, help="this server's name")
    a.add_argument("--remote", required=True, help="remote store URL, e.g. http://127.0.0.1:8001")
    _bind_arguments(a)
    a.add_argument("--nic-gbps", type=float, default=None,
                   help="this server's NIC limit, shared fairly by all its fetches (default: none)")
    a.add_argument("--cache-gb", type=float, default=0.0,
                   help="host memory for whole models kept after use, LRU (default: 0, no cache)")
    a.add_argument("--streams", type=int, default=2,
                   help="parallel range connections per fetch (default: 2)")
    a.add_argument("--chunk-mb", type=float, default=64.0,
                   help="largest fetch chunk: each chunk is one range request, and chunks go "
                        "to the streams in order; on an unlimited NIC the image is cut into "
                        "equal chunks, as many as a multiple of --streams; on a limited NIC a "
                        "chunk is ~40 ms of its rate, at least 1 MiB (default: 64)")
    lease.add_arguments(a, "agent")
    a.set_defaults(func=_cmd_agent)


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from hydraserve.store.remote import ModelStore, make_app
    from hydraserve.store.server import serve

    store = ModelStore(args.root)
    log.info("store: %d model(s) under %s: %s; egress %s Gbps", len(store.names()), args.root,
             ", ".join(store.names()) or "-", args.egress_gbps or "unlimited")
    orphaned = asyncio.run(serve(make_app(store, args.egress_gbps), args.host, args.port,
                                 "hydraserve store", token=args.cluster_token,
                                 lease=lease.from_args(args)))
    if orphaned and args.orphan_cleanup:
        import shutil

        shutil.rmtree(args.orphan_cleanup, ignore_errors=True)
        log.info("store: removed the orphaned cluster's folder %s", args.orphan_cleanup)
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    import asyncio

    from hydraserve.store.agent import AgentConfig, make_app
    from hydraserve.store.server import serve

    cfg = AgentConfig(node=args.node, remote=args.remote, nic_gbps=args.nic_gbps,
                      cache_gb=args.cache_gb, streams=args.streams, chunk_mb=args.chunk_mb,
                      token=args.cluster_token)
    log.info("agent %s: remote %s, NIC %s Gbps, cache %.1f GB", args.node, args.remote,
             args.nic_gbps or "unlimited", args.cache_gb)
    asyncio.run(serve(make_app(cfg), args.host, args.port, f"hydraserve agent {args.node}",
                      token=args.cluster_token, lease=lease.from_args(args)))
    return 0
