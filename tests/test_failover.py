"""The control plane dies and comes back (real `hydraserve serve` processes, a local cluster of
real store, agent and worker processes, the official openai client with its own retries):

  a. a standby takes over a SIGKILLed leader: the same instances answer warm, no cold start
  b. no standby: `serve` again within the orphan grace adopts the cluster, warm
  c. nothing after the kill: every process of the cluster exits by itself after the grace and
     frees its shared memory
  d. a rolling restart (SIGTERM with a standby up) under streaming load drops no request

Every case counts its requests in the fault table, like tests/test_faults.py."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from hydraserve.store.launch import ServerProcess
from tests.faults import TABLE, Counts, Outcome, alive, descendants, kill

pytestmark = [pytest.mark.faults, pytest.mark.multiprocess, pytest.mark.slow]

openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    """A cluster's files and its port; `serve` starts a gateway of it."""

    def __init__(self, tmp: Path, model_dirs: dict[str, str], grace: float = 60.0):
        self.tmp, self.port, self.grace = tmp, _free_port(), grace
        self.url = f"http://127.0.0.1:{self.port}"
        cluster = {"device": "cpu", "scale": {"size_scale": 100, "after_fetch_ms": 2000},
                   "servers": [{"name": f"s{i}", "gpus": [24], "nic_gbps": 16}
                               for i in range(2)]}
        models = {"models": [{"name": "m", "path": model_dirs["llama"], "ttft_slo_s": 30},
                             {"name": "m2", "path": model_dirs["qwen2"], "ttft_slo_s": 30}]}
        (tmp / "cluster.yaml").write_text(yaml.safe_dump(cluster))
        (tmp / "models.yaml").write_text(yaml.safe_dump(models))
        self.gateways: list[ServerProcess] = []
        self.procs: set[int] = set()  # every process of the cluster seen so far

    def serve(self, *extra: str, wait: bool = True) -> ServerProcess:
        n = len(self.gateways)
        g = ServerProcess(["serve", "--cluster", str(self.tmp / "cluster.yaml"), "--models",
                           str(self.tmp / "models.yaml"), "--port", str(self.port),
                           "--keep-alive", "300", "--sse-heartbeat", "0", "--shutdown-grace", "5",
                           "--orphan-grace", f"{self.grace:g}", *extra],
                          self.tmp / f"gateway{n}.log", wait=wait, timeout=120,
                          env={"HYDRASERVE_CACHE": str(self.tmp / "cache")})
        self.gateways.append(g)
        return g

    def note(self, gateway: ServerProcess) -> set[int]:
        pids = descendants(gateway.proc.pid)
        self.procs |= pids
        return pids

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="-", max_retries=5, timeout=60)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def cold_starts(self) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("hydraserve_cold_starts_total"))

    def instances(self) -> set[str]:
        return {i["id"] for i in self.get("/admin/instances")["instances"]
                if i["state"] == "ready"}

    def close(self) -> list[str]:
        """Stop what is left (only a failed test leaves anything); what was left."""
        left = []
        for g in self.gateways:
            if g.proc.poll() is None:
                left.append(f"gateway {g.proc.pid}")
            self.procs |= descendants(g.proc.pid)
            g.stop(timeout=30)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in self.procs:
            if alive(p):
                left.append(f"pid {p}")
                kill(p)
        return left


@pytest.fixture
def site(tmp_path, model_dirs):
    made: list[Site] = []

    def make(**kw) -> Site:
        s = Site(tmp_path, model_dirs, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _complete(client, model: str = "m", max_tokens: int = 6) -> Outcome:
    try:
        out = client.completions.create(model=model, prompt="hello there", max_tokens=max_tokens,
                                        temperature=0,
                                        extra_body={"ignore_eos": True})
    except openai.APIError as e:
        return Outcome("error", f"{type(e).__name__}: {e}", ended=time.monotonic())
    return Outcome("answered", tokens=out.usage.completion_tokens, ended=time.monotonic(),
                   text=out.choices[0].text)


def _stream(client, model: str = "m", max_tokens: int = 12) -> Outcome:
    try:
        text, finished = "", None
        for chunk in client.completions.create(model=model, prompt="hello there", stream=True,
                                               max_tokens=max_tokens,
                                               extra_body={"ignore_eos": True}):
            if chunk.choices:
                text += chunk.choices[0].text
                finished = chunk.choices[0].finish_reason or finished
    except openai.APIError as e:
        return Outcome("error", f"{type(e).__name__}: {e}", ended=time.monotonic())
    if finished != "length":
        return Outcome("lost", f"ended without its finish reason ({finished})")
    return Outcome("answered", ended=time.monotonic(), text=text)


def _warm(site: Site) -> dict[str, str]:
    """Both models served once (cold starts); what each answers greedily."""
    client = site.client()
    out = {m: _complete(client, m) for m in ("m", "m2")}
    assert all(o.kind == "answered" for o in out.values()), out
    return {m: o.text for m, o in out.items()}


def _is_runtime(pid: int) -> bool:
    try:
        return b"hydraserve.cli\0runtime" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _segments(pids: set[int]) -> list[str]:
    return [s.name for p in pids for s in Path("/dev/shm").glob(f"hs_{p}_*")]


def _record(case: str, counts: Counts, fixed: str) -> None:
    TABLE[case] = (counts, fixed)
    assert counts.lost == 0, counts.notes


def _wait_line(path: Path, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{path.name} never said {text!r}"
        time.sleep(0.05)


def test_a_standby_takes_over_a_killed_leader_warm(site):
    s = site()
    leader = s.serve()
    texts = _warm(s)
    before = s.instances()
    assert len(before) == 2 and s.cold_starts() == 2
    standby = s.serve("--standby", wait=False)
    _wait_line(s.tmp / "gateway1.log", "waiting to take over")
    cluster = s.note(leader)
    kill(leader.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    counts = Counts()
    client = s.client()
    outcomes = [_complete(client, m) for m in ("m", "m2")]
    counts.add(outcomes)
    assert [o.kind for o in outcomes] == ["answered"] * 2, outcomes
    assert [o.text for o in outcomes] == [texts["m"], texts["m2"]]  # the same greedy tokens
    assert standby.wait_ready(10).endswith(str(s.port))
    assert s.instances() == before  # the same instances, adopted
    assert s.cold_starts() == 0  # none since the kill
    assert all(alive(p) for p in cluster)  # the store, the agents and the workers lived on
    print(f"standby answered {outcomes[0].ended - killed:.2f} s after the kill")
    _record("j. leader SIGKILLed, a standby up", counts,
            "the standby takes the leader's file lock, adopts the cluster's instances warm")
    standby.stop(timeout=30)  # SIGTERM with no standby: the cluster stops with it
    assert standby.proc.returncode == 0
    deadline = time.monotonic() + 30
    while any(alive(p) for p in cluster) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in cluster if alive(p)]
    assert not _segments(cluster)


def test_a_restart_within_the_grace_adopts_the_cluster_warm(site):
    s = site()
    first = s.serve("--warm-runtime", "1")  # its workers were pooled runtimes: adopted too
    texts = _warm(s)
    before = s.instances()
    cluster = s.note(first)
    record = json.loads((s.tmp / "cache" / "clusters" / f"port-{s.port}" /
                         "record.json").read_text())
    recorded = {record["store"]["pid"], *(e["pid"] for e in record["agents"].values()),
                *(e["pid"] for e in record["workers"].values())}
    idle = {p for p in cluster - recorded if _is_runtime(p)}
    assert idle  # the first gateway's pool had idle runtimes
    kill(first.proc.pid, signal.SIGKILL)
    time.sleep(1)
    s.serve("--warm-runtime", "1")
    counts = Counts()
    outcome = _complete(s.client())
    counts.add([outcome])
    assert outcome.kind == "answered" and outcome.text == texts["m"], outcome
    assert s.instances() == before and s.cold_starts() == 0
    # the store, the agents and the workers lived on; the idle pooled runtimes left with their
    # gateway (they read their assignment from it), and the new one keeps its own
    assert all(alive(p) for p in recorded)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in idle) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in idle if alive(p)]
    _record("k. gateway SIGKILLed, served again", counts,
            "the cluster record and the leases: the new gateway adopts store, agents, workers")


def test_a_killed_gateways_cluster_exits_by_itself_after_the_grace(site):
    s = site(grace=3)
    gateway = s.serve("--warm-runtime", "1")
    _warm(s)
    cluster = s.note(gateway)
    assert len(cluster) >= 6  # the store, two agents, two workers, the runtimes
    home = s.tmp / "cache" / "clusters" / f"port-{s.port}"
    assert (home / "lease").exists() and json.loads((home / "record.json").read_text())["workers"]
    kill(gateway.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    deadline = killed + 3 + 60
    while any(alive(p) for p in cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in cluster if alive(p)]
    assert not left, left
    print(f"the cluster was gone {time.monotonic() - killed:.1f} s after the kill (grace 3 s)")
    assert not _segments(cluster)
    logs = list((s.tmp / "cache" / "logs").rglob("*.log"))
    assert any("exiting as an orphan" in p.read_text() for p in logs)


def test_a_rolling_restart_under_streaming_load_drops_nothing(site):
    s = site()
    old = s.serve()
    _warm(s)
    before = s.instances()
    s.serve("--standby", wait=False)
    _wait_line(s.tmp / "gateway1.log", "waiting to take over")
    outcomes: list[Outcome] = []
    streams: list[threading.Thread] = []
    stop = threading.Event()

    def load() -> None:  # ~5 streams a second for as long as the test runs
        client = s.client()
        while not stop.is_set():
            started = time.monotonic()
            t = threading.Thread(target=lambda: outcomes.append(_stream(client)), daemon=True)
            t.start()
            streams.append(t)
            stop.wait(max(0.0, 0.2 - (time.monotonic() - started)))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    time.sleep(2)
    old.proc.send_signal(signal.SIGTERM)
    assert old.proc.wait(60) == 0
    time.sleep(2)
    stop.set()
    loader.join(10)
    for t in streams:
        t.join(60)
    counts = Counts()
    counts.add(outcomes)
    assert len(outcomes) >= 10
    assert all(o.kind == "answered" for o in outcomes), [o for o in outcomes
                                                          if o.kind != "answered"]
    assert s.instances() == before and s.cold_starts() == 0
    assert "handing the cluster over" in (s.tmp / "gateway0.log").read_text()
    _record("l. rolling restart: leader SIGTERMed, a standby up", counts,
            "the old leader hands over and finishes its streams; the new one serves warm")
