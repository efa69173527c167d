"""Helpers of the fault suite: a gateway over a local cluster run in this process (so a test can
find and kill the processes behind it), a client that classifies every request's outcome, and
the counts table the suite prints."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hydraserve.cluster.local import LocalCluster
from hydraserve.config import GatewayConfig, ModelConfigEntry, cluster_from_dict
from hydraserve.store.launch import descendants, pid_alive as alive  # noqa: F401 - re-exported


TABLE: dict[str, tuple["Counts", str]] = {}  # fault case -> (counts, what fixed it)


@dataclass
class Outcome:
    kind: str  # "answered", "error" (a clear error: a status or an SSE error event), "lost"
    detail: str = ""
    tokens: int = 0
    ended: float = 0.0  # time.monotonic() of the final event
    text: str = ""  # what came back (a stream's chunks joined)


@dataclass
class Counts:
    sent: int = 0
    answered: int = 0
    error: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            self.sent += 1
            if o.kind == "answered":
                self.answered += 1
            elif o.kind == "error":
                self.error += 1
            else:
                self.lost += 1
                self.notes.append(o.detail)


def ask(url: str, body: dict, timeout: float = 60.0,
        on_token: threading.Event | None = None, token_mark: int = 1) -> Outcome:
    """Send one completion request; classify what came back. ``timeout`` bounds every read: a
    request silent for longer is lost. With ``on_token`` (streams), the event is set once
    ``token_mark`` tokens came."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if not body.get("stream"):
            payload = resp.read()
            try:
                out = json.loads(payload)
            except ValueError:
                return Outcome("lost", f"status {resp.status}, not JSON: {payload[:80]!r}")
            if resp.status == 200 and out.get("choices"):
                return Outcome("answered", tokens=out["usage"]["completion_tokens"],
                               ended=time.monotonic(), text=out["choices"][0]["text"])
            if resp.status >= 400 and isinstance(out.get("error"), dict) \
                    and out["error"].get("message"):
                return Outcome("error", f"{resp.status} {out['error']['message']}",
                               ended=time.monotonic())
            return Outcome("lost", f"status {resp.status}: {out}")
        if resp.status != 200:
            out = json.loads(resp.read() or b"{}")
            kind = "error" if isinstance(out.get("error"), dict) else "lost"
            return Outcome(kind, f"{resp.status} {out}", ended=time.monotonic())
        tokens, finished, text = 0, False, ""
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                if finished:
                    return Outcome("answered", tokens=tokens, ended=time.monotonic(), text=text)
                return Outcome("lost", "[DONE] without a finish reason")
            event = json.loads(data)
            if "error" in event:
                return Outcome("error", str(event["error"].get("message")), tokens,
                               time.monotonic())
            choice = event["choices"][0] if event.get("choices") else {}
            if choice.get("text"):
                tokens += 1
                text += choice["text"]
                if on_token is not None and tokens >= token_mark:
                    on_token.set()
            if choice.get("finish_reason"):
                finished = True
        return Outcome("lost", f"the stream ended after {tokens} chunks without a final event")
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Outcome("lost", f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def ask_many(url: str, bodies: list[dict], timeout: float = 60.0) -> list[Outcome]:
    with ThreadPoolExecutor(max(1, len(bodies))) as pool:
        return list(pool.map(lambda b: ask(url, b, timeout), bodies))


class Rig:
    """`hydraserve serve`'s gateway, in this process on its own thread, over a LocalCluster:
    the test reaches the control plane's state and the cluster's processes."""

    def __init__(self, tmp: Path, models: dict[str, str], servers: int = 2, nic_gbps: float = 16,
                 ttft_slo_s: float = 30, sizes: dict[str, float] | None = None, **gw):
        import uvicorn

        from hydraserve.gateway.app import Gateway, create_app

        self.tmp = Path(tmp)
        cfg = cluster_from_dict({
            "device": "cpu", "scale": {"size_scale": 100, "after_fetch_ms": 2000},
            "servers": [{"name": f"s{i}", "gpus": [24], "nic_gbps": nic_gbps}
                        for i in range(servers)]})
        gw_cfg = GatewayConfig(port=0, sse_heartbeat_s=0, **{"keep_alive_s": 30.0, **gw})
        entries = [ModelConfigEntry(name=n, path=p, ttft_slo_s=ttft_slo_s,
                                    size_gb=(sizes or {}).get(n)) for n, p in models.items()]
        self.cluster = LocalCluster(cfg, str(self.tmp / "logs"))
        self.gateway = Gateway(gw_cfg, cfg, self.cluster, entries)
        self.controller = self.gateway.controller
        ready = threading.Event()
        sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.gateway, ready.set),
                                                    log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        self.agent_pids: set[int] = set()
        if not ready.wait(60):
            self.close()
            raise RuntimeError("the gateway did not start")
        self.note_agents()

    def note_agents(self) -> None:
        self.agent_pids |= {a.proc.pid for a in self.cluster._agents.values()}

    def call(self, coro, timeout: float = 60.0):
        """Run ``coro`` on the gateway's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.gateway._loop).result(timeout)

    def scale_to_zero(self, model: str) -> None:
        for inst in self.instances(model):
            self.call(self.controller.stop_instance(inst.id))

    def instances(self, model: str) -> list:
        ep = self.controller.model(model)
        return list(ep.instances) if ep else []

    def wait_for(self, what, timeout: float = 60.0, every: float = 0.02):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = what()
            if got:
                return got
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def close(self) -> None:
        """Stop the gateway (which stops every worker, agent and the store); make sure."""
        self.server.should_exit = True
        self.thread.join(60)
        self.note_agents()
        self.cluster.close()  # idempotent; frees a killed agent's segments too

    def leftovers(self) -> list[str]:
        """Processes and shared-memory segments of this rig still there after close()."""
        left = [f"segment {s.name}" for pid in self.agent_pids
                for s in Path("/dev/shm").glob(f"hs_{pid}_*")]
        procs = [*self.cluster._workers.values(), *self.cluster._agents.values(),
                 *([self.cluster._store] if self.cluster._store else [])]
        left += [f"process {p.proc.pid} ({' '.join(p.args[:2])})" for p in procs
                 if p.proc.poll() is None]
        return left


def kill(pid: int, sig: int = 9) -> None:
    """Signal one process we started (by its pid)."""
    os.kill(pid, sig)


def format_table(table: dict[str, tuple[Counts, str]]) -> str:
    rows = [f"{'fault':<52} {'sent':>5} {'answered':>9} {'clear error':>12} {'lost':>5}"]
    for case, (c, _) in sorted(table.items()):
        rows.append(f"{case:<52} {c.sent:>5} {c.answered:>9} {c.error:>12} {c.lost:>5}")
    return "\n".join(rows)


