"""Fetch-path benchmark: how close cold-start fetches come to the emulated NIC, how much a p = 4
split gains, and whether loading hides behind the fetch.

    python benchmarks/fetch.py [--nic-gbps 0.8] [--repeats 3] [--json]

Starts a real remote store and four storage agents (one per emulated server, NIC limit each) as
processes on this machine, with a ~200 MB float16 Llama. Measured, medians of --repeats:
  - whole model on one node, vs its floor S / B;
  - a p = 4 split fetched on four nodes at once (order to last byte), vs S / (4 B);
  - prefetch order -> every tensor in the engine's parameters (streaming load), vs the fetch alone;
  - the unthrottled loopback rate (no NIC limit): store -> agent, our whole path;
  - the raw limit of the same machine in the same run: a sender process ``sendfile``s the same
    checkpoint file to a receiver process that ``recv_into``s a fresh shared-memory segment
    (1 stream and as many as the agent uses), and both processes' CPU seconds per GB;
  - the store's and the agent's CPU seconds per GB during the loopback fetches (from their own
    CPU times), so our path's overhead is a ratio to the raw pair that holds on any machine.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydraserve.make_model import ModelSpec, make_model  # noqa: E402
from hydraserve.store.image import ImageKind, ImageSpec  # noqa: E402
from hydraserve.store.launch import ServerProcess  # noqa: E402
from hydraserve.store.progressive import ProgressiveRegion, agent_call  # noqa: E402

AGENT_STREAMS = 2  # the storage agent's default number of connections per fetch
SPEC = ModelSpec(arch="llama", hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048,
                 vocab=16384, dtype="float16", seed=0)
MODEL = "llama-200m"


def fetch(agent: str, spec: ImageSpec) -> dict:
    """Order a fetch, wait for its last byte, free the region; returns the region's report."""
    r = agent_call(agent, "POST", "/prefetch", spec.to_dict())
    done = agent_call(agent, "GET", f"/regions/{r['id']}?wait=1", timeout=600)
    agent_call(agent, "DELETE", f"/regions/{r['id']}")
    if done["state"] != "ready":
        raise RuntimeError(f"fetch failed: {done}")
    return done


def fetch_parallel(agents: list[str], specs: list[ImageSpec]) -> float:
    """Seconds from the first order to the last byte of all fetches, run at once."""
    out: list[dict] = [{}] * len(specs)

    def one(i: int) -> None:
        out[i] = fetch(agents[i], specs[i])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the raw limit: sendfile -> recv_into between two processes, nothing else ----------------
def _raw_sender(path: str, size: int, streams: int, port_out, result) -> None:
    """Accept ``streams`` connections and sendfile each its share of the file's first ``size``
    bytes; report this process's CPU seconds for the transfer."""
    srv = socket.create_server(("127.0.0.1", 0))
    port_out.send(srv.getsockname()[1])
    conns = [srv.accept()[0] for _ in range(streams)]
    c0 = time.process_time()
    share = -(-size // streams)

    def send(i: int) -> None:
        with open(path, "rb") as f:
            pos, end = i * share, min(size, (i + 1) * share)
            while pos < end:
                pos += os.sendfile(conns[i].fileno(), f.fileno(), pos, end - pos)
        conns[i].close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.send(time.process_time() - c0)
    srv.close()


def _raw_receiver(port: int, size: int, streams: int, result) -> None:
    """Connect ``streams`` times and recv_into a fresh shared-memory segment until every byte
    is in (as the agent does: first touch of fresh pages included); report (seconds, CPU)."""
    shm = shared_memory.SharedMemory(create=True, size=size)
    try:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
        share = -(-size // streams)
        t0, c0 = time.perf_counter(), time.process_time()

        def recv(i: int) -> None:
            pos, end = i * share, min(size, (i + 1) * share)
            view = shm.buf[pos:end]
            got = 0
            while got < end - pos:
                n = socks[i].recv_into(view[got:])
                if not n:
                    raise ConnectionError("the sender stopped early")
                got += n
            view.release()

        threads = [threading.Thread(target=recv, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result.send((time.perf_counter() - t0, time.process_time() - c0))
        for s in socks:
            s.close()
    finally:
        shm.close()
        shm.unlink()


def raw_limit(path: Path, size: int, streams: int) -> dict:
    """One raw transfer of ``size`` bytes of ``path``: GB/s and each side's CPU s per GB."""
    ctx = mp.get_context("spawn")
    port_rx, port_tx = ctx.Pipe(duplex=False)
    snd_rx, snd_tx = ctx.Pipe(duplex=False)
    rcv_rx, rcv_tx = ctx.Pipe(duplex=False)
    sender = ctx.Process(target=_raw_sender, args=(str(path), size, streams, port_tx, snd_tx))
    procs = [sender]
    sender.start()
    try:
        port = port_rx.recv()
        procs.append(ctx.Process(target=_raw_receiver, args=(port, size, streams, rcv_tx)))
        procs[-1].start()
        seconds, rx_cpu = rcv_rx.recv()
        tx_cpu = snd_rx.recv()
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    gb = size / 1e9
    return {"gbytes_per_s": gb / seconds, "receiver_cpu_s_per_gb": rx_cpu / gb,
            "sender_cpu_s_per_gb": tx_cpu / gb}


def streamed_load(agent: str, model_dir: Path) -> tuple[float, float]:
    """(seconds from the prefetch order to every tensor loaded, seconds of the fetch itself)."""
    from hydraserve.engine.config import EngineConfig, ModelConfig
    from hydraserve.engine.runner import StageRunner
    from hydraserve.engine.stream_load import iter_region
    from hydraserve.store.checkpoint import scan_checkpoint
    from hydraserve.store.layout import StageLayout

    layout = StageLayout(scan_checkpoint(model_dir))
    runner = StageRunner(ModelConfig.from_dir(model_dir), layout.stage(0, 1),
                         EngineConfig(dtype="float16", num_kv_blocks=1), 1, 1024)
    t0 = time.perf_counter()
    region = ProgressiveRegion.attach(agent, ImageSpec(MODEL, ImageKind.FULL))
    runner.load(iter_region(region))
    t_loaded = time.perf_counter() - t0
    report = agent_call(agent, "GET", f"/regions/{region.region_id}?wait=1")
    region.close()
    return t_loaded, report["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nic-gbps", type=float, default=0.8, help="per-node NIC (default 0.8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", default=str(ROOT / ".cache" / "bench-llama-200m-fp16"))
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        print(f"making benchmark model in {model_dir} ...", file=sys.stderr)
        make_model(model_dir, SPEC)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    B = args.nic_gbps * 1e9 / 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        (root / MODEL).symlink_to(model_dir.resolve())
        procs = [ServerProcess(["store", "serve", "--root", str(root)], Path(tmp) / "store.log")]
        try:
            store = procs[0].url
            nodes = []
            for i in range(4):
                procs.append(ServerProcess(["store", "agent", "--node", f"node{i}", "--remote", store,
                                            "--nic-gbps", str(args.nic_gbps)],
                                           Path(tmp) / f"agent{i}.log"))
                nodes.append(procs[-1].url)
            procs.append(ServerProcess(["store", "agent", "--node", "fast", "--remote", store],
                                       Path(tmp) / "fast.log"))
            fast = procs[-1].url
            full = ImageSpec(MODEL, ImageKind.FULL)
            fetch(nodes[0], full)  # warm the page cache and the store's image tables
            t_full = statistics.median(fetch(nodes[0], full)["seconds"] for _ in range(args.repeats))
            stages = [ImageSpec(MODEL, ImageKind.STAGE, 4, r) for r in range(4)]
            t_p4 = statistics.median(fetch_parallel(nodes, stages) for _ in range(args.repeats))
            runs = [streamed_load(nodes[1], model_dir) for _ in range(args.repeats)]
            t_load = statistics.median(r[0] for r in runs)
            t_fetch_during_load = statistics.median(r[1] for r in runs)
            # our path and the raw limit, interleaved run by run so both see the same machine
            loop, raw1, rawn = [], [], []
            store_pid, agent_pid = procs[0].proc.pid, procs[-1].proc.pid
            cpu_store = cpu_agent = 0.0
            biggest = max(model_dir.glob("*.safetensors"), key=lambda f: f.stat().st_size)
            raw_size = biggest.stat().st_size
            raw_limit(biggest, raw_size, 1)  # warm-up: page cache, process start
            for _ in range(args.repeats):
                s0, a0 = cpu_seconds(store_pid), cpu_seconds(agent_pid)
                loop.append(fetch(fast, full)["seconds"])
                cpu_store += cpu_seconds(store_pid) - s0
                cpu_agent += cpu_seconds(agent_pid) - a0
                raw1.append(raw_limit(biggest, raw_size, 1))
                rawn.append(raw_limit(biggest, raw_size, AGENT_STREAMS))
            loop_s = statistics.median(loop)
        finally:
            for p in reversed(procs):
                p.stop()
    res = {
        "model_bytes": size, "nic_gbps": args.nic_gbps,
        "full_fetch_s": t_full, "full_floor_s": size / B,
        "p4_fetch_s": t_p4, "p4_floor_s": size / (4 * B),
        "nic_efficiency": (size / t_full) / B,
        "p4_speedup": t_full / t_p4,
        "load_s": t_load, "fetch_alone_s": t_full,
        "overlap_ratio": t_load / t_full,
        "loopback_gbytes_per_s": size / loop_s / 1e9,
        "raw_limit_gbytes_per_s": statistics.median(r["gbytes_per_s"] for r in rawn),
        "raw_limit_1_stream_gbytes_per_s": statistics.median(r["gbytes_per_s"] for r in raw1),
        "raw_receiver_cpu_s_per_gb": statistics.median(r["receiver_cpu_s_per_gb"] for r in rawn),
        "raw_sender_cpu_s_per_gb": statistics.median(r["sender_cpu_s_per_gb"] for r in rawn),
        "agent_cpu_s_per_gb": cpu_agent / (args.repeats * size / 1e9),
        "store_cpu_s_per_gb": cpu_store / (args.repeats * size / 1e9),
        "agent_streams": AGENT_STREAMS,
    }
    res["path_vs_raw_limit"] = res["loopback_gbytes_per_s"] / res["raw_limit_gbytes_per_s"]
    res["agent_cpu_vs_raw_receiver"] = res["agent_cpu_s_per_gb"] / res["raw_receiver_cpu_s_per_gb"]
    print(f"\nmodel: {size / 1e6:.0f} MB (float16 Llama); NIC {args.nic_gbps} Gbps per node; "
          f"medians of {args.repeats}")
    print(f"{'what':<46}{'seconds':>9}{'floor':>9}{'ratio':>8}")
    print(f"{'whole model, 1 node':<46}{t_full:>9.2f}{size / B:>9.2f}{t_full / (size / B):>8.2f}")
    print(f"{'p = 4 split, 4 nodes at once':<46}{t_p4:>9.2f}{size / 4 / B:>9.2f}"
          f"{t_p4 / (size / 4 / B):>8.2f}")
    print(f"{'prefetch -> all tensors loaded (1 node)':<46}{t_load:>9.2f}{t_full:>9.2f}"
          f"{t_load / t_full:>8.2f}")
    print(f"\nNIC efficiency {res['nic_efficiency']:.1%}; p = 4 speed-up {res['p4_speedup']:.2f}x; "
          f"overlap ratio {res['overlap_ratio']:.3f} (fetch alone inside the load run: "
          f"{t_fetch_during_load:.2f} s)")
    print(f"\nunthrottled, store -> agent ({AGENT_STREAMS} streams): "
          f"{res['loopback_gbytes_per_s']:.2f} GB/s; raw limit sendfile -> recv_into "
          f"{res['raw_limit_gbytes_per_s']:.2f} GB/s ({AGENT_STREAMS} streams), "
          f"{res['raw_limit_1_stream_gbytes_per_s']:.2f} GB/s (1 stream): "
          f"{res['path_vs_raw_limit']:.2f}x of the raw limit")
    print(f"CPU seconds per GB: agent {res['agent_cpu_s_per_gb']:.3f}, raw receiver "
          f"{res['raw_receiver_cpu_s_per_gb']:.3f} ({res['agent_cpu_vs_raw_receiver']:.2f}x); "
          f"store {res['store_cpu_s_per_gb']:.3f}, raw sender {res['raw_sender_cpu_s_per_gb']:.3f}")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
