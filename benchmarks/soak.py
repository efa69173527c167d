"""Soak: warm serving for many rounds in every worker mode, watching for what a leak would grow.

    python benchmarks/soak.py [--modes p1,p2,consolidated,gateway] [--rounds 30]
                              [--concurrency 8] [--drop 0.33] [--seed 0] [--json]

Modes p1, p2 and consolidated: a pipeline of real worker processes (`LocalPipeline`, the
configurations of tests/test_warm_serving.py: a standalone worker; the head of a p = 2 pipeline;
the head of a p = 3 pipeline after consolidation), sent /generate streams. Mode gateway: a real
`hydraserve serve` on a one-server cluster (one standalone worker, keep-alive of an hour), sent
streamed OpenAI completions; the gateway and every process it started are watched. All on a
small Llama made here, with an 8 MB KV cache (256 blocks, which the first rounds touch whole:
its pages are committed lazily and would read as growth).

After one warm-up round, ``--rounds`` rounds of ``--concurrency`` concurrent streams, seeded:
prompts of 3-60 tokens and max_tokens of 8-128 (ignore_eos); a ``--drop`` share of them is
dropped by its client after a random number of tokens. After each round, once the workers run
nothing and every KV block is free again: each process's resident memory, open file
descriptors and threads (from /proc), and the shared-memory segments in /dev/shm.

Per mode it reports the first and last measured round, each figure's growth from the end of the
first quarter of the rounds to the last (what warm-up leaves alone), memory's slope per round
after the first quarter, and the streams: sent, completed with exactly max_tokens tokens,
dropped, wrong (any other ending: a stream cut or an error). A leak: threads or segments whose
lowest value in the last quarter of the rounds is above their highest in the first, descriptors
likewise by more than --concurrency (pooled keep-alive connections come and go), or a stream
that ended wrong; the exit status is then 1. Memory is reported, not judged (caches fill up to their bounds). Linux
only (/proc)."""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from hydraserve.httpjson import call  # noqa: E402
from hydraserve.make_model import ModelSpec, make_model  # noqa: E402

MODES = ("p1", "p2", "consolidated", "gateway")
FIGURES = ("rss_mb", "fds", "threads")
GATEWAY_MODEL = "soak"
KV_CACHE_MB = 8  # 256 blocks of 16 tokens for the soak's model: 8 streams of up to 188 fit


def _proc(pid: int) -> dict:
    """Resident memory (MB), open descriptors and threads of one live process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"])}


def _shm_segments() -> int:
    try:
        return len(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return 0


def _stream(url: str, path: str, body: dict, max_tokens: int, drop_after: int | None) -> str:
    """One stream on its own connection: "completed" (exactly ``max_tokens`` tokens -- the
    usage's count where the stream reports one -- and finish_reason length), "dropped" (closed
    by us after ``drop_after`` tokens), else "wrong". Reads /generate's JSON lines and the
    OpenAI server-sent events alike (a completion's choices; a /generate item is its own)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return "wrong"
        tokens, finish, used = 0, None, None
        for line in resp:
            line = line.strip().removeprefix(b"data: ")
            if not line.startswith(b"{"):  # blank lines, heartbeats, [DONE]
                continue
            item = json.loads(line)
            if "error" in item:
                return "wrong"
            for choice in item.get("choices", [item]):
                tokens += choice.get("token_id") is not None or "text" in choice
                finish = choice.get("finish_reason") or finish
            used = (item.get("usage") or {}).get("completion_tokens", used)
            if drop_after is not None and tokens >= drop_after:
                conn.sock.close()  # the client goes away mid-stream
                return "dropped"
        counted = tokens if used is None else used
        return "completed" if counted == max_tokens and finish == "length" else "wrong"
    except (OSError, http.client.HTTPException, ValueError):
        return "wrong"
    finally:
        conn.close()


def one_stream(url: str, prompt: list[int], max_tokens: int, drop_after: int | None) -> str:
    """A /generate stream straight to a worker (`_stream`)."""
    return _stream(url, "/generate", {"prompt_ids": prompt, "max_tokens": max_tokens,
                                      "ignore_eos": True}, max_tokens, drop_after)


def one_completion(url: str, prompt: list[int], max_tokens: int, drop_after: int | None) -> str:
    """A streamed /v1/completions through the gateway (`_stream`), with its usage."""
    return _stream(url, "/v1/completions", {
        "model": GATEWAY_MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
        max_tokens, drop_after)


def _worker_busy(h: dict) -> bool:
    """A worker's /health says it runs or holds something (a stage without a scheduler
    reports no free-block count)."""
    free = h.get("kv_blocks_free")
    return bool(h["running"] or h["waiting"] or (free is not None and free != h["kv_blocks"]))


def _until_idle(busy: Callable[[], list], timeout: float = 30.0) -> None:
    """Until ``busy()`` lists nothing: every worker runs nothing and holds no KV block (a
    dropped stream's abort and its blocks' release included)."""
    deadline = time.monotonic() + timeout
    while found := busy():
        if time.monotonic() > deadline:
            raise RuntimeError(f"still busy {timeout:.0f} s after a round: {found}")
        time.sleep(0.02)


class GatewayTarget:
    """`hydraserve serve` of one model on a one-server cluster, warmed by its first request;
    the same face as `PipelineTarget` to the rounds: ``head``, ``send``, ``wait_idle``,
    ``processes``, ``stop``."""

    def __init__(self, model_dir: str, work: Path):
        import yaml

        from hydraserve.store.launch import ServerProcess

        (work / "cluster.yaml").write_text(yaml.safe_dump({
            "device": "cpu", "scale": {"size_scale": 1, "after_fetch_ms": 2000},
            "servers": [{"name": "node0", "gpus": [24.0], "nic_gbps": 100.0, "cache_gb": 0}]}))
        (work / "models.yaml").write_text(yaml.safe_dump({"models": [
            {"name": GATEWAY_MODEL, "path": model_dir, "ttft_slo_s": 30}]}))
        self.proc = ServerProcess(
            ["serve", "--cluster", str(work / "cluster.yaml"), "--models",
             str(work / "models.yaml"), "--port", "0", "--keep-alive", "3600",
             "--exec-type", "hydraserve_with_single_worker", "--kv-cache-mb", str(KV_CACHE_MB),
             "--log-dir", str(work / "logs")], work / "serve.log", timeout=60)
        self.head = self.proc.url
        self.send = one_completion

    def _busy(self) -> list:
        status = call(self.head, "GET", "/admin/instances")
        busy = [(i["id"], i["active"]) for i in status["instances"] if i["active"]]
        busy += [(m, v["queued"]) for m, v in status["models"].items() if v["queued"]]
        for inst in status["instances"]:
            for st in inst["stages"]:
                if _worker_busy(h := call(st["url"], "GET", "/health")):
                    busy.append((st["worker"], h["running"], h["kv_blocks_free"]))
        return busy

    def wait_idle(self) -> None:
        _until_idle(self._busy)

    def processes(self) -> dict[str, int]:
        """The gateway and every process under it, by role (the second word of its command
        line: store, agent, worker, ...) and pid."""
        procs = {"gateway": self.proc.proc.pid}
        parents = {self.proc.proc.pid}
        for _ in range(3):  # children, grandchildren, ...
            for d in Path("/proc").iterdir():
                if not d.name.isdigit() or int(d.name) in procs.values():
                    continue
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    argv = (d / "cmdline").read_bytes().split(b"\0")
                except (OSError, IndexError, ValueError):
                    continue
                if ppid in parents:
                    procs[f"{_role(argv)}:{d.name}"] = int(d.name)
                    parents.add(int(d.name))
        return procs

    def stop(self) -> None:
        self.proc.stop()


def _role(argv: list[bytes]) -> str:
    """A process's role from its command line: `python -m hydraserve.cli worker ...` -> worker,
    `... store agent ...` -> agent, `... store serve ...` -> store; multiprocessing's resource
    tracker (python ... -c ...) -> resource_tracker."""
    args = [a.decode(errors="replace") for a in argv[1:] if a]
    if "-c" in args:
        return "resource_tracker" if "resource_tracker" in " ".join(args) else "python-c"
    if "-m" in args:
        args = args[args.index("-m") + 2:]
    words = [a for a in args if not a.startswith("-")][:2]
    if words[:1] == ["store"]:
        return "agent" if words[1:] == ["agent"] else "store"
    return words[0] if words else "process"


def _measure(procs: dict[str, int], samples: int = 3) -> dict:
    """Each process's figures, the least of ``samples`` readings 50 ms apart (a connection of
    the idle check may still be closing at the first)."""
    readings = []
    for i in range(samples):
        if i:
            time.sleep(0.05)
        readings.append({name: _proc(pid) for name, pid in procs.items()})
    out: dict = {name: {f: min(rd[name][f] for rd in readings) for f in FIGURES}
                 for name in procs}
    out["shm_segments"] = _shm_segments()
    return out


def _growth(rounds: list[dict]) -> dict:
    """Each figure's change from the end of the first quarter of the rounds to the last."""
    start = rounds[max(0, len(rounds) // 4 - 1)]
    last = rounds[-1]
    growth = {"shm_segments": last["shm_segments"] - start["shm_segments"]}
    for name in last:
        if name in start and isinstance(last[name], dict):
            growth[name] = {f: round(last[name][f] - start[name][f], 1) for f in FIGURES}
    return growth


def _bands(rounds: list[dict]) -> dict:
    """For each count that must not grow (descriptors, threads, segments): its highest value
    in the first quarter of the rounds and its lowest in the last quarter. Pooled connections
    make descriptors move within a band; a leak lifts the last quarter above the first."""
    q = max(1, len(rounds) // 4)
    first, last = rounds[:q], rounds[-q:]
    bands = {"shm_segments": [max(r["shm_segments"] for r in first),
                              min(r["shm_segments"] for r in last)]}
    for name in rounds[-1]:
        if isinstance(rounds[-1][name], dict) and all(name in r for r in rounds):
            bands[name] = {f: [max(r[name][f] for r in first), min(r[name][f] for r in last)]
                           for f in ("fds", "threads")}
    return bands


class PipelineTarget:
    """A `LocalPipeline` in one worker mode, warmed (and consolidated) before the rounds."""

    def __init__(self, mode: str, model_dir: str):
        from hydraserve.cluster.pipeline import GroupConfig, LocalPipeline
        from hydraserve.engine.config import EngineConfig

        # a KV cache the first rounds touch whole: its pages are committed as blocks are first
        # written (torch.zeros maps them lazily), which would read as growth
        kw = dict(threads_per_worker=1, engine=EngineConfig(kv_cache_mb=KV_CACHE_MB))
        cfg = {"p1": GroupConfig(model_dir, p=1, **kw), "p2": GroupConfig(model_dir, p=2, **kw),
               "consolidated": GroupConfig(model_dir, p=3, all_card=(0,), **kw)}[mode]
        self.pipe = LocalPipeline(cfg).__enter__()
        try:
            list(self.pipe.generate([1, 2, 3], max_tokens=2, ignore_eos=True))
            if mode == "consolidated":
                self.pipe.consolidate()
                deadline = time.monotonic() + 60
                while not self.pipe.health(0)["standalone"]:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the head did not consolidate in 60 s")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        self.head = self.pipe.head
        self.send = one_stream

    def _busy(self) -> list:
        return [(rank, h["running"], h["waiting"], h.get("kv_blocks_free"))
                for rank, w in enumerate(self.pipe.workers) if w.proc.poll() is None
                if _worker_busy(h := self.pipe.health(rank))]

    def wait_idle(self) -> None:
        _until_idle(self._busy)

    def processes(self) -> dict[str, int]:
        procs = {f"worker{r}": w.proc.pid for r, w in enumerate(self.pipe.workers)
                 if w.proc.poll() is None}
        procs.update({f"agent{r}": a.proc.pid for r, a in enumerate(self.pipe.agents)})
        return procs

    def stop(self) -> None:
        self.pipe.stop()


def soak_mode(mode: str, model_dir: str, args: argparse.Namespace, work: Path) -> dict:
    rng = random.Random(f"{args.seed}-{mode}")
    counts = {"sent": 0, "completed": 0, "dropped": 0, "wrong": 0}
    rounds: list[dict] = []
    t0 = time.monotonic()
    target = GatewayTarget(model_dir, work) if mode == "gateway" else \
        PipelineTarget(mode, model_dir)
    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            for r in range(args.rounds + 1):  # round 0 warms up and is not measured
                jobs = []
                for _ in range(args.concurrency):
                    n = rng.randint(8, 128)
                    prompt = [rng.randrange(3, 1000) for _ in range(rng.randint(3, 60))]
                    drop = rng.randint(1, n - 1) if rng.random() < args.drop else None
                    jobs.append(pool.submit(target.send, target.head, prompt, n, drop))
                results = [j.result() for j in jobs]
                target.wait_idle()
                if r == 0:
                    continue
                counts["sent"] += len(results)
                for res in results:
                    counts[res] += 1
                rounds.append(_measure(target.processes()))
    finally:
        target.stop()
    return {"mode": mode, "rounds": args.rounds, "concurrency": args.concurrency,
            "seconds": round(time.monotonic() - t0, 1), "streams": counts,
            "first": rounds[0], "last": rounds[-1], "growth": _growth(rounds),
            "bands": _bands(rounds),
            "rss_mb_per_round_after_warmup": {
                name: round(_slope([rd[name]["rss_mb"] for rd in rounds[len(rounds) // 4:]]), 3)
                for name in rounds[-1] if isinstance(rounds[-1][name], dict)}}


def _slope(ys: list[float]) -> float:
    """Least-squares slope per round (0 for fewer than two points)."""
    if len(ys) < 2:
        return 0.0
    xs = range(len(ys))
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def leaks(result: dict) -> list[str]:
    """What grew that should not have, and streams that ended wrong. Grew: threads or
    shared-memory segments whose lowest value in the last quarter of the rounds is above their
    highest in the first; descriptors likewise by more than ``concurrency`` -- the keep-alive
    connections a client pool (the gateway's to its worker) may hold, one per concurrent
    stream, which come and go in both processes at once. A descriptor per stream or per round
    grows past that within a few rounds."""
    out = []
    if result["streams"]["wrong"]:
        out.append(f"{result['streams']['wrong']} stream(s) ended wrong")
    for name, band in result["bands"].items():
        if name == "shm_segments":
            if band[1] > band[0]:
                out.append(f"shared-memory segments: {band[0]} -> {band[1]}")
            continue
        for f, (early, late) in band.items():
            if late > early + (result["concurrency"] if f == "fds" else 0):
                out.append(f"{name}: {f} {early} -> {late}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of "
                                                             + ", ".join(MODES))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--drop", type=float, default=0.33, help="share of streams dropped early")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON last")
    args = ap.parse_args()
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown or args.rounds < 1 or args.concurrency < 1:
        ap.error(f"unknown mode(s) {sorted(unknown)}" if unknown else
                 "--rounds and --concurrency must be at least 1")
    out = {"machine": machine(), "seed": args.seed, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        model = str(make_model(Path(tmp) / "m", ModelSpec(arch="llama", hidden=128, layers=4,
                                                          vocab=1024, seed=3)))
        for mode in modes:
            work = Path(tmp) / mode
            work.mkdir()
            res = soak_mode(mode, model, args, work)
            res["leaks"] = leaks(res)
            out["modes"][mode] = res
            s = res["streams"]
            rss = ", ".join(f"{k} {v:+.3f}" for k, v in res["rss_mb_per_round_after_warmup"].items())
            print(f"{mode:<13} {res['seconds']:>6.1f} s  streams {s['sent']}: {s['completed']} "
                  f"completed, {s['dropped']} dropped, {s['wrong']} wrong; RSS MB/round after "
                  f"warm-up: {rss}; leaks: {'; '.join(res['leaks']) or 'none'}", flush=True)
    if args.json:
        print(json.dumps(out))
    return 1 if any(m["leaks"] for m in out["modes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
