"""The fetch path with real processes: remote store -> storage agent -> shared memory -> loader."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file

from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.sequence import SamplingParams
from hydraserve.engine.stream_load import iter_region
from hydraserve.make_model import ModelSpec, make_model
from hydraserve.store.checkpoint import scan_checkpoint
from hydraserve.store.image import ImageKind, ImageSpec, StageImage
from hydraserve.store.layout import StageLayout
from hydraserve.store.progressive import ProgressiveRegion, RegionError, agent_call
from hydraserve.store.remote import parse_range

from servers import CuttingProxy, Server, shm_exists

pytestmark = pytest.mark.multiprocess


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory) -> str:
    """~16 MB of weights: big enough for bandwidth measurements at a few hundred Mbps."""
    return str(make_model(tmp_path_factory.mktemp("big") / "m",
                          ModelSpec(arch="llama", hidden=256, layers=4, vocab=2048, seed=7)))


@pytest.fixture(scope="module")
def root(tmp_path_factory, model_dirs, big_dir):
    r = tmp_path_factory.mktemp("store")
    os.symlink(model_dirs["llama"], r / "tiny")
    os.symlink(model_dirs["qwen2"], r / "qwen")
    for name in ("big-a", "big-b", "big-c", "big-d"):
        os.symlink(big_dir, r / name)
    return r


@pytest.fixture(scope="module")
def store(root, tmp_path_factory):
    s = Server(["store", "serve", "--root", str(root)], tmp_path_factory.mktemp("log") / "store.log")
    yield s
    s.stop()


@pytest.fixture
def agent_factory(store, tmp_path):
    started = []

    def start(*extra: str, remote: str | None = None) -> Server:
        a = Server(["store", "agent", "--node", f"n{len(started)}", "--remote", remote or store.url,
                    *extra], tmp_path / f"agent{len(started)}.log")
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


def _read_all(agent_url: str, spec: ImageSpec) -> tuple[dict[str, torch.Tensor], bytes]:
    region = ProgressiveRegion.attach(agent_url, spec)
    try:
        tensors = {n: t.clone() for n, t in iter_region(region, timeout=30)}
        raw = bytes(region.data)
    finally:
        region.close()
    return tensors, raw


@pytest.mark.parametrize("model", ["tiny", "qwen"])
def test_images_are_byte_identical_to_the_checkpoint(root, agent_factory, model):
    agent = agent_factory()
    direct = load_file(str(root / model / "model.safetensors"))
    layout = StageLayout(scan_checkpoint(root / model))
    full, raw = _read_all(agent.url, ImageSpec(model, ImageKind.FULL))
    assert set(full) == set(direct)
    assert raw == b"".join(StageImage.build(root / model, ImageSpec(model, ImageKind.FULL)).read())
    for p in (1, 2, 3, 4):
        for rank in range(p):
            stage, raw = _read_all(agent.url, ImageSpec(model, ImageKind.STAGE, p, rank))
            rest, _ = _read_all(agent.url, ImageSpec(model, ImageKind.REST, p, rank))
            assert list(stage) == layout.tensor_names(layout.stage(rank, p))
            assert set(stage) | set(rest) == set(direct) and not set(stage) & set(rest)
            # the region is a valid safetensors file on its own, equal to the checkpoint's tensors
            independent = st_load(raw)
            for name, t in {**stage, **rest}.items():
                assert t.dtype == direct[name].dtype and torch.equal(t, direct[name]), name
            for name, t in independent.items():
                assert torch.equal(t, direct[name])


def test_streamed_stages_generate_like_a_local_load(root, agent_factory):
    agent = agent_factory()
    local = LLMEngine(root / "tiny", pipeline=2)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = local.generate([[5, 6, 7, 8]], params)[0].token_ids
    regions = []

    def weights(spec):
        regions.append(ProgressiveRegion.attach(agent.url, ImageSpec("tiny", ImageKind.STAGE, 2,
                                                                     spec.rank)))
        return iter_region(regions[-1])

    streamed = LLMEngine(root / "tiny", pipeline=2, weights=weights)
    for region in regions:
        region.close()
    assert len(regions) == 2
    assert streamed.generate([[5, 6, 7, 8]], params)[0].token_ids == expected


def test_loader_yields_tensors_before_the_fetch_ends(root, agent_factory):
    agent = agent_factory("--nic-gbps", "0.2")  # 25 MB/s: ~0.6 s for the 16 MB image
    region = ProgressiveRegion.attach(agent.url, ImageSpec("big-a", ImageKind.FULL))
    try:
        seen = [region.received() for _ in iter_region(region, timeout=30)]
    finally:
        region.close()
    assert seen[0] < region.length / 2  # the first tensor came while most bytes were missing
    assert seen[-1] == region.length


def test_cut_connections_resume_and_stay_byte_identical(root, store, agent_factory):
    port = int(store.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, after=3 * 2**20 + 12345, cuts=3)
    try:
        agent = agent_factory("--chunk-mb", "8", remote=f"http://127.0.0.1:{proxy.port}")
        tensors, raw = _read_all(agent.url, ImageSpec("big-a", ImageKind.FULL))
    finally:
        proxy.close()
    assert proxy.cuts_done >= 1
    direct = load_file(str(root / "big-a" / "model.safetensors"))
    assert set(tensors) == set(direct)
    assert all(torch.equal(tensors[n], direct[n]) for n in direct)
    assert "resuming" in agent.log_path.read_text()


def _wait_ready(agent_url: str, rid: str) -> dict:
    return agent_call(agent_url, "GET", f"/regions/{rid}?wait=1", timeout=120)


def test_two_fetches_share_the_nic_fairly(agent_factory):
    gbps = 0.4
    agent = agent_factory("--nic-gbps", str(gbps))
    alone = agent_call(agent.url, "POST", "/prefetch", ImageSpec("big-a", ImageKind.FULL).to_dict())
    alone = _wait_ready(agent.url, alone["id"])
    a = agent_call(agent.url, "POST", "/prefetch", ImageSpec("big-b", ImageKind.FULL).to_dict())
    b = agent_call(agent.url, "POST", "/prefetch", ImageSpec("big-c", ImageKind.FULL).to_dict())
    a, b = _wait_ready(agent.url, a["id"]), _wait_ready(agent.url, b["id"])
    assert 0.8 * gbps < alone["gbps"] <= 1.05 * gbps
    for r in (a, b):
        assert 0.35 * gbps < r["gbps"] < 0.65 * gbps, r
    assert abs(a["seconds"] - b["seconds"]) < 0.25 * max(a["seconds"], b["seconds"])


def test_cache_is_lru_and_never_evicts_a_region_in_use(root, agent_factory):
    size = StageImage.build(root / "big-a", ImageSpec("big-a", ImageKind.FULL)).size
    agent = agent_factory("--cache-gb", str(2.5 * size / 1e9))

    def use(model: str, keep: bool = False) -> dict:
        r = agent_call(agent.url, "POST", "/attach", ImageSpec(model, ImageKind.FULL).to_dict())
        _wait_ready(agent.url, r["id"])
        if not keep:
            agent_call(agent.url, "POST", "/release", {"id": r["id"]})
        return r

    def cached() -> list[str]:
        return agent_call(agent.url, "GET", "/cache")["models"]

    use("big-a")
    use("big-b")
    assert cached() == ["big-a", "big-b"]
    again = use("big-a")  # a cache hit: the same region, now most recently used
    assert again["state"] == "ready"
    use("big-c")  # evicts big-b, the least recently used
    assert cached() == ["big-a", "big-c"]
    held = use("big-a", keep=True)  # in use from now on
    use("big-c")
    use("big-d")  # big-a is LRU but in use: big-c goes
    assert cached() == ["big-a", "big-d"]
    assert shm_exists(held["shm"])
    # a stage image is not cached: freed (and its segment unlinked) with its last reader
    r = agent_call(agent.url, "POST", "/attach", ImageSpec("tiny", ImageKind.STAGE, 2, 1).to_dict())
    _wait_ready(agent.url, r["id"])
    assert shm_exists(r["shm"])
    agent_call(agent.url, "POST", "/release", {"id": r["id"]})
    assert not shm_exists(r["shm"])
    with pytest.raises(RegionError, match="404"):
        agent_call(agent.url, "GET", f"/regions/{r['id']}")


def test_prefetch_is_idempotent(agent_factory):
    agent = agent_factory()
    spec = ImageSpec("tiny", ImageKind.STAGE, 3, 1).to_dict()
    a = agent_call(agent.url, "POST", "/prefetch", spec)
    b = agent_call(agent.url, "POST", "/prefetch", spec)
    assert a["id"] == b["id"] and a["shm"] == b["shm"]
    assert len(agent_call(agent.url, "GET", "/regions")["regions"]) == 1


def test_bad_requests_get_4xx_and_servers_stay_up(store, agent_factory):
    base = store.url
    assert _get(f"{base}/models/nope/image")[0] == 404
    assert _get(f"{base}/models/tiny/image?p=0")[0] == 400
    assert _get(f"{base}/models/tiny/image?p=99")[0] == 400
    assert _get(f"{base}/models/tiny/image?p=2&rank=2")[0] == 400
    assert _get(f"{base}/models/tiny/image?kind=bogus")[0] == 400
    assert _get(f"{base}/models/tiny/image?p=two")[0] == 400
    assert _get(f"{base}/models/..%2F..%2Fetc%2Fpasswd/image")[0] == 404
    assert _get(f"{base}/models/../../etc/passwd")[0] == 404
    assert _get(f"{base}/models/tiny/image", {"Range": "bytes=999999999-"})[0] == 416
    assert _get(f"{base}/models/tiny/layout?p=9")[0] == 400
    status, body, headers = _get(f"{base}/models/tiny/image?kind=full", {"Range": "bytes=0-7"})
    assert status == 206 and len(body) == 8 and headers["Content-Range"].startswith("bytes 0-7/")
    listing = json.loads(_get(f"{base}/models")[1])["models"]
    assert {m["name"] for m in listing} >= {"tiny", "qwen", "big-a"}
    layout = json.loads(_get(f"{base}/models/tiny/layout?p=2")[1])
    assert [s["layers"] for s in layout["stages"]] == [[0, 2], [2, 4]]

    agent = agent_factory()
    for body, code in [({"model": "nope", "kind": "full"}, "404"),
                       ({"model": "tiny", "kind": "stage", "p": 2, "rank": 5}, "400"),
                       ({"model": "tiny", "kind": "weird"}, "400"),
                       ({"kind": "full"}, "400"),
                       ({"model": "../../etc/passwd", "kind": "full"}, "404")]:
        with pytest.raises(RegionError, match=code):
            agent_call(agent.url, "POST", "/prefetch", body)
    with pytest.raises(RegionError, match="400"):
        agent_call(agent.url, "POST", "/release", {"nope": 1})
    assert _get(f"{base}/health")[0] == 200
    assert agent_call(agent.url, "GET", "/health")["ok"]


def test_sigterm_removes_every_segment(agent_factory):
    agent = agent_factory()
    names = []
    for rank in range(3):
        r = agent_call(agent.url, "POST", "/prefetch",
                       ImageSpec("tiny", ImageKind.STAGE, 3, rank).to_dict())
        names.append(r["shm"])
    agent_call(agent.url, "POST", "/attach", ImageSpec("big-a", ImageKind.FULL).to_dict())
    assert all(shm_exists(n) for n in names)
    assert agent.stop() == 0
    time.sleep(0.2)
    assert not any(shm_exists(n) for n in names)


def test_parse_range():
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=95-200", 100) == (95, 100)
    for bad in ("bytes=100-", "bytes=5-2", "items=0-1", "bytes=-"):
        with pytest.raises(ValueError):
            parse_range(bad, 100)


def test_a_dead_reader_is_released(agent_factory):
    import subprocess
    import sys

    agent = agent_factory()
    code = ("import sys, time; from hydraserve.store.progressive import ProgressiveRegion;"
            "from hydraserve.store.image import ImageSpec, ImageKind;"
            f"r = ProgressiveRegion.attach({agent.url!r}, ImageSpec('tiny', ImageKind.STAGE, 2, 0));"
            "print(r.shm.name, flush=True); time.sleep(60)")
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        name = reader.stdout.readline().strip()
        assert shm_exists(name)
        (region,) = agent_call(agent.url, "GET", "/regions")["regions"]
        assert region["readers"] == 1
    finally:
        reader.kill()
        reader.wait()
    deadline = time.monotonic() + 5
    while shm_exists(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not shm_exists(name)
    assert agent_call(agent.url, "GET", "/regions")["regions"] == []


def test_a_plain_curl_range_get_reads_the_image(root, store, tmp_path):
    """The store sends tensor bytes with sendfile; to any HTTP client it is still plain HTTP/1.1
    with ranges (curl, not our client, reads it here)."""
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    image = b"".join(StageImage.build(root / "big-a", ImageSpec("big-a", ImageKind.FULL)).read())
    url = f"{store.url}/models/big-a/image?kind=full"
    for first, last in [(0, 99), (1000, 5 * 2**20 + 7), (len(image) - 10, len(image) - 1)]:
        out = tmp_path / "part"
        subprocess.run(["curl", "-sS", "-f", "-r", f"{first}-{last}", "-o", str(out), url],
                       check=True, timeout=60)
        assert out.read_bytes() == image[first:last + 1]
    whole = subprocess.run(["curl", "-sS", "-f", url], check=True, capture_output=True,
                           timeout=60).stdout
    assert whole == image


def test_the_store_egress_limit_holds_and_is_shared(root, tmp_path):
    """sendfile moves the bytes, but the store still paces them: one fetch gets the egress
    limit, two at once get about half each."""
    gbps = 0.4
    store = Server(["store", "serve", "--root", str(root), "--egress-gbps", str(gbps)],
                   tmp_path / "store.log")
    agents = []
    try:
        for i in range(2):
            agents.append(Server(["store", "agent", "--node", f"e{i}", "--remote", store.url],
                                 tmp_path / f"agent{i}.log"))
        alone = agent_call(agents[0].url, "POST", "/prefetch",
                           ImageSpec("big-a", ImageKind.FULL).to_dict())
        alone = _wait_ready(agents[0].url, alone["id"])
        a = agent_call(agents[0].url, "POST", "/prefetch",
                       ImageSpec("big-b", ImageKind.FULL).to_dict())
        b = agent_call(agents[1].url, "POST", "/prefetch",
                       ImageSpec("big-c", ImageKind.FULL).to_dict())
        a, b = _wait_ready(agents[0].url, a["id"]), _wait_ready(agents[1].url, b["id"])
    finally:
        for s in [*agents, store]:
            s.stop()
    assert 0.8 * gbps < alone["gbps"] <= 1.05 * gbps, alone
    for r in (a, b):
        assert 0.35 * gbps < r["gbps"] < 0.65 * gbps, r


def test_range_connection_errors_and_stop(root, store):
    """The agent's receiving client on its own: exact ranges into a buffer over one kept-alive
    connection, the store's error message on a 4xx, and a stop from another thread ends a
    slow receive at once."""
    import threading

    from hydraserve.store.bandwidth import Link
    from hydraserve.store.rangeget import HTTPStatusError, RangeConnection

    image = b"".join(StageImage.build(root / "big-a", ImageSpec("big-a", ImageKind.FULL)).read())
    path = "/models/big-a/image?kind=full&p=1&rank=0"
    conn = RangeConnection(store.url)
    reported = []
    try:
        for first, n in [(0, 8), (12345, 3 * 2**20), (len(image) - 100, 100)]:
            buf = bytearray(n)
            conn.get_into(path, first, memoryview(buf), Link(None), reported.append)
            assert bytes(buf) == image[first:first + n]
            sock = conn.sock
            assert sock is not None  # kept alive for the next range
        assert sum(reported) == 8 + 3 * 2**20 + 100
        with pytest.raises(HTTPStatusError, match="unknown model") as e:
            conn.get_into("/models/nope/image?kind=full", 0, memoryview(bytearray(8)),
                          Link(None), reported.append)
        assert e.value.status == 404
        assert conn.sock is None  # an error never leaves a connection to reuse

        slow, stop, failed = Link(0.02), threading.Event(), []  # 2.5 MB/s: 16 MB take 6 s

        def receive():
            try:
                conn.get_into(path, 0, memoryview(bytearray(len(image))), slow,
                              lambda n: None, stop)
            except (ConnectionError, OSError) as err:
                failed.append(err)

        t = threading.Thread(target=receive)
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        stop.set()
        conn.close()
        t.join(5)
        assert not t.is_alive() and failed and time.monotonic() - t0 < 1.0
    finally:
        conn.close()


@pytest.mark.parametrize("streams", [1, 2, 3])
@pytest.mark.parametrize("size", [5 * 2**20 + 17, 50 * 2**20, 201_377_240, 2**30 + 1])
def test_unthrottled_chunks_split_an_image_evenly_over_the_streams(streams, size):
    """On an unlimited NIC the spans are at most --chunk-mb, equal, and as many as a multiple of
    the streams (no stream left alone with one last chunk), unless they would go under MIN_CHUNK.
    With 16 MB chunks and 2 streams a 50 MB image used to go 16 + 16 + 16 + 2 MB, one stream
    carrying 32 MB while the other carried 18 MB."""
    from hydraserve.store.agent import MIN_CHUNK, Agent, AgentConfig
    agent = Agent(AgentConfig("n0", "http://127.0.0.1:9", streams=streams, chunk_mb=16))
    limited = Agent(AgentConfig("n1", "http://127.0.0.1:9", nic_gbps=0.8, streams=streams))
    try:
        chunk = agent._chunk_bytes(size)
        n = -(-size // chunk)
        assert chunk <= 16 * 2**20
        assert size - (n - 1) * chunk > chunk - n  # the last span is as long as the others
        assert n % streams == 0 or size // (-(-n // streams) * streams) < MIN_CHUNK
        if n > 1:
            assert chunk >= MIN_CHUNK
        assert limited._chunk_bytes(size) == int(0.8e9 / 8 * 0.04)  # ~40 ms of the NIC, as before
    finally:
        agent.receivers.shutdown()
        limited.receivers.shutdown()


_EXIT_PROBE = r"""
import asyncio, json, signal
from asyncio import selector_events
from aiohttp import web
from hydraserve.store.server import serve

seen = {}
close_pipe = selector_events.BaseSelectorEventLoop._close_self_pipe

def probe(self):
    fd = signal.set_wakeup_fd(-1)  # reads the wake-up fd (and puts it back)
    signal.set_wakeup_fd(fd)
    seen.update(wakeup_fd=fd, sigterm=str(signal.getsignal(signal.SIGTERM)))
    close_pipe(self)

selector_events.BaseSelectorEventLoop._close_self_pipe = probe

async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, stop.set)
    await serve(web.Application(), "127.0.0.1", 0, "probe", stop)

asyncio.run(main())
print(json.dumps(seen))
"""


def test_a_server_closes_its_loop_with_no_signal_wakeup_fd_and_sigterm_ignored():
    """When the loop closes its wake-up pipe, no signal may still write there (a second SIGTERM
    during a worker's exit printed "Exception ignored when trying to write to the signal wakeup
    fd ... Bad file descriptor" into its log), and SIGTERM is already ignored. Read at the very
    moment the pipe closes, in a server process of its own."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _EXIT_PROBE], capture_output=True, text=True,
                         timeout=60, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"wakeup_fd": -1, "sigterm": str(signal.SIG_IGN)}, (seen, out.stderr)
