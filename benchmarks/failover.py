"""The control plane dies and comes back, measured on the default model (real `hydraserve
serve` processes on a local cluster; the official openai client with its own retries).

    python benchmarks/failover.py [--runs 5] [--grace 10] [--json]

Each run is a fresh cluster on a free port with two endpoints of SmolLM2-135M-Instruct (m1, m2),
both warmed first. Five scenarios, each ``--runs`` times:

  standby    kill -9 of the leader with a standby up, under --rate streams/s on both
             endpoints: seconds from the kill until the standby listens and until its first
             answer (behind the load's own requests), cold starts after the kill (the new
             leader's counter), streams that failed (only those the dead leader relayed may) and
             requests sent after the kill that failed (none may)
  restart    kill -9 with no standby, `serve` again 5 s later: the first answer's latency
             against the warm latency before the kill, and cold starts after
  orphans    kill -9 with nothing after: seconds until no process of the cluster is left
             (--grace is its orphan grace), shared-memory segments and temporary folders left
  rolling    SIGTERM of the leader with a standby up, under --rate streams/s: failed requests
             and cold starts (both must be 0)
  steady     the control: the rolling scenario's load on the same leader, no restart (the
             cold starts the load makes by itself; the leader's counter less the warm-up's)

It prints medians over the runs with the machine's name. The machine must be otherwise quiet.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from hydraserve.store.launch import ServerProcess, descendants, pid_alive  # noqa: E402

RATE = 5.0  # streams per second, spread over both endpoints (--rate)
MODELS = ("m1", "m2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    def __init__(self, tmp: Path, model: str, grace: float):
        self.tmp, self.grace, self.port = tmp, grace, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (tmp / "models.yaml").write_text(json.dumps({"models": [
            {"name": m, "path": model, "ttft_slo_s": 12} for m in MODELS]}))
        self.gateways: list[ServerProcess] = []
        self.procs: set[int] = set()

    def serve(self, *extra: str, wait: bool = True) -> ServerProcess:
        g = ServerProcess(["serve", "--models", str(self.tmp / "models.yaml"), "--port",
                           str(self.port), "--keep-alive", "600", "--orphan-grace",
                           f"{self.grace:g}", "--log-dir", str(self.tmp / "logs"), *extra],
                          self.tmp / f"gateway{len(self.gateways)}.log", wait=wait, timeout=180,
                          env={"HYDRASERVE_CACHE": str(self.tmp / "cache")})
        self.gateways.append(g)
        return g

    def client(self, retries: int = 2):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="-", max_retries=retries,
                             timeout=120)

    def cold_starts(self) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            return sum(float(ln.rsplit(" ", 1)[1]) for ln in r.read().decode().splitlines()
                       if ln.startswith("hydraserve_cold_starts_total"))

    def close(self) -> None:
        for g in self.gateways:
            self.procs |= descendants(g.proc.pid)
            g.stop(timeout=30)
        deadline = time.monotonic() + 60
        while any(pid_alive(p) for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in self.procs:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)


def ask(client, model: str, stream: bool = False) -> tuple[bool, float, str]:
    """(answered, seconds, what went wrong)."""
    import openai

    t0 = time.perf_counter()
    try:
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
            temperature=0, stream=stream)
        if stream:
            done = None
            for chunk in out:
                done = (chunk.choices[0].finish_reason if chunk.choices else None) or done
            if done is None:
                return False, time.perf_counter() - t0, "no finish reason"
    except openai.APIError as e:
        return False, time.perf_counter() - t0, type(e).__name__
    return True, time.perf_counter() - t0, ""


class Load:
    """Streams at `RATE` per second over both endpoints, each on its own thread."""

    def __init__(self, site: Site):
        self.client = site.client()
        self.rows: list[tuple[float, bool, float]] = []  # (sent, answered, seconds)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pacer = threading.Thread(target=self._pace, daemon=True)
        self._pacer.start()

    def _one(self, i: int) -> None:
        sent = time.monotonic()
        ok, took, _ = ask(self.client, MODELS[i % 2], stream=True)
        self.rows.append((sent, ok, took))

    def _pace(self) -> None:
        i = 0
        while not self._stop.wait(1 / RATE):
            t = threading.Thread(target=self._one, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
            i += 1

    def stop(self) -> list[tuple[float, bool, float]]:
        self._stop.set()
        self._pacer.join(10)
        for t in self._threads:
            t.join(180)
        return self.rows


def warm(site: Site) -> float:
    """Both endpoints cold-started; the warm latency (median of 3) afterwards."""
    client = site.client()
    threads = [threading.Thread(target=ask, args=(client, m)) for m in MODELS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.median(ask(client, MODELS[0])[1] for _ in range(3))


def standby(site: Site) -> dict:
    leader = site.serve()
    warm(site)
    site.serve("--standby", wait=False)
    time.sleep(3)  # the standby has imported and waits on the lock
    load = Load(site)
    time.sleep(3)
    under_load = site.cold_starts() - len(MODELS)  # the load's own scale-ups, before the kill
    site.procs |= descendants(leader.proc.pid)
    os.kill(leader.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    listens = first = None
    while listens is None and time.monotonic() - killed < 60:
        try:
            with urllib.request.urlopen(site.url + "/health", timeout=5):
                listens = time.monotonic() - killed
        except OSError:
            time.sleep(0.02)
    client = site.client(retries=8)
    while first is None and time.monotonic() - killed < 60:
        if ask(client, MODELS[0])[0]:
            first = time.monotonic() - killed
    time.sleep(3)
    rows = load.stop()
    return {"listens_after_s": listens, "answers_after_s": first,
            "cold_starts_before": under_load,
            "cold_starts_after": site.cold_starts(),
            "streams": len(rows), "failed_in_flight": sum(1 for s, ok, t in rows
                                                         if not ok and s < killed),
            "failed_sent_after": sum(1 for s, ok, t in rows if not ok and s >= killed)}


def restart(site: Site) -> dict:
    first = site.serve()
    warm_s = warm(site)
    site.procs |= descendants(first.proc.pid)
    os.kill(first.proc.pid, signal.SIGKILL)
    time.sleep(5)
    site.serve()
    ok, took, why = ask(site.client(), MODELS[0])
    return {"warm_s": warm_s, "first_after_restart_s": took if ok else None,
            "ratio": took / warm_s if ok else None, "cold_starts_after": site.cold_starts()}


def orphans(site: Site) -> dict:
    gateway = site.serve()
    warm(site)
    procs = descendants(gateway.proc.pid)
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    os.kill(gateway.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    while any(pid_alive(p) for p in procs) and time.monotonic() - killed < site.grace + 120:
        time.sleep(0.2)
    gone = time.monotonic() - killed
    segments = [s for p in procs for s in Path("/dev/shm").glob(f"hs_{p}_*")]
    new_tmp = [n for n in set(os.listdir(tempfile.gettempdir())) - tmp_before
               if n.startswith("hydraserve-")]
    return {"gone_after_s": gone, "left": sum(1 for p in procs if pid_alive(p)),
            "segments_left": len(segments), "tmp_left": len(new_tmp)}


def rolling(site: Site, restart: bool = True) -> dict:
    leader = site.serve()
    warm(site)
    site.serve("--standby", wait=False)
    time.sleep(3)
    load = Load(site)
    time.sleep(3)
    under_load = site.cold_starts() - len(MODELS)
    if restart:
        leader.proc.send_signal(signal.SIGTERM)
        leader.proc.wait(120)
    else:  # the control: the same load for as long, on the same leader
        time.sleep(2)
    time.sleep(3)
    rows = load.stop()
    after = site.cold_starts() - (0 if restart else len(MODELS))
    return {"streams": len(rows), "failed": sum(1 for _, ok, _ in rows if not ok),
            "cold_starts_before": under_load, "cold_starts_after": after,
            "old_leader_exit": leader.proc.returncode}


def steady(site: Site) -> dict:
    """The rolling scenario's load without the restart: the scale-ups the load makes itself."""
    return rolling(site, restart=False)


SCENARIOS = {"standby": standby, "restart": restart, "orphans": orphans, "rolling": rolling,
             "steady": steady}


def main() -> int:
    global RATE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--grace", type=float, default=10.0, help="the clusters' --orphan-grace")
    ap.add_argument("--rate", type=float, default=RATE,
                    help=f"the load's streams per second (default: {RATE:g})")
    ap.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the clusters are stopped on the way
    RATE = args.rate
    from hydraserve.cli import _cache_root
    from hydraserve.gateway.commands import default_model

    model = default_model(_cache_root(os.environ))
    out: dict[str, list[dict]] = {}
    for name in args.only or SCENARIOS:
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="failover-") as tmp:
                site = Site(Path(tmp), model, args.grace)
                try:
                    row = SCENARIOS[name](site)
                finally:
                    site.close()
            out.setdefault(name, []).append(row)
            print(f"{name} {i + 1}/{args.runs}: {row}", flush=True)
    summary = {name: {k: statistics.median(r[k] for r in rows if r[k] is not None)
                      if any(r[k] is not None for r in rows) else None for k in rows[0]}
               for name, rows in out.items()}
    print(f"\nmachine: {machine()}; load {RATE:g} streams/s; medians of {args.runs} runs (rolling: "
          f"{sum(1 for r in out.get('rolling', []) if r['failed'] == 0)} of "
          f"{len(out.get('rolling', []))} runs with 0 failed)")
    for name, med in summary.items():
        print(f"  {name:8} " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in med.items()))
    if args.json:
        print(json.dumps({"machine": machine(), "rate": RATE, "runs": out, "medians": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
