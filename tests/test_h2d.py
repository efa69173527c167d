"""The device side of a streaming load (hydraserve/engine/h2d.py), on a real storage agent's region.

No GPU can run these tests: the CUDA calls are recorded by `RecordingBackend`, a fake with
`CudaBackend`'s interface (checked below) that copies for real on CPU. So everything up to the
first CUDA call is checked: one registration per region at the region's real address, every copy
issued non_blocking on the side stream from registered bytes, the side stream waiting on the
current one first, one synchronisation after the last copy and before the first step, the
unregistration before the mapping closes, the fallback when registration fails; and on CPU with
no backend, the path of before: the same tokens.
"""
from __future__ import annotations

import inspect
import logging
import mmap
import os
import queue
import threading
from contextlib import contextmanager

import pytest
import torch

import hydraserve.engine.h2d as h2d
from hydraserve.engine.config import EngineConfig, ModelConfig, num_kv_blocks
from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.runner import StageRunner
from hydraserve.engine.sequence import SamplingParams
from hydraserve.protocol import Peer
from hydraserve.store.checkpoint import scan_checkpoint
from hydraserve.store.image import ImageKind, ImageSpec
from hydraserve.store.layout import StageLayout
from hydraserve.store.progressive import COUNTER, ProgressiveRegion
from hydraserve.worker.core import Worker, WorkerConfig
from hydraserve.worker.timeline import Timeline

from servers import Server

pytestmark = pytest.mark.multiprocess  # a store and an agent process

PROMPT, N = [5, 9, 13, 2], 12


class FakeStream:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait_stream(self, other: "FakeStream") -> None:
        self.log.append(("wait", self.name, other.name))

    def synchronize(self) -> None:
        self.log.append(("sync", self.name))


class RecordingBackend:
    """Stands in for `h2d.CudaBackend`: records every call; copies on CPU for real, noting
    whether the source lies in registered memory. ``fail``: the cudaError registration returns,
    or the exception it raises."""

    def __init__(self, fail: int = 0):
        self.fail = fail
        self.log: list[tuple] = []
        self.main = self.current = FakeStream(self.log, "main")
        self.pinned: dict[int, int] = {}
        self.streams = 0

    def host_register(self, ptr: int, size: int) -> int:
        self.log.append(("register", ptr, size))
        if isinstance(self.fail, Exception):
            raise self.fail
        if not self.fail:
            self.pinned[ptr] = size
        return self.fail

    def host_unregister(self, ptr: int) -> int:
        self.log.append(("unregister", ptr))
        return 0 if self.pinned.pop(ptr, None) is not None else 712  # not registered

    def current_stream(self) -> FakeStream:
        return self.current

    def new_stream(self) -> FakeStream:
        self.streams += 1
        return FakeStream(self.log, f"side{self.streams}")

    @contextmanager
    def use_stream(self, stream: FakeStream):
        prev, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = prev

    def copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
        ptr = src.data_ptr()
        pinned = any(p <= ptr and ptr + src.nbytes <= p + n for p, n in self.pinned.items())
        self.log.append(("copy", self.current.name, non_blocking, pinned))
        dst.copy_(src)

    def kinds(self) -> list[str]:
        return [e[0] for e in self.log]


def test_the_fake_has_the_cuda_backends_interface():
    def methods(cls) -> dict[str, list[str]]:
        return {n: list(inspect.signature(f).parameters) for n, f in vars(cls).items()
                if callable(f) and not n.startswith("_")}

    real = methods(h2d.CudaBackend)
    assert real and {n: p for n, p in methods(RecordingBackend).items() if n in real} == real


@pytest.fixture(scope="module")
def agent(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("h2d-store")
    os.symlink(llama_dir, root / "tiny")
    logs = tmp_path_factory.mktemp("h2d-logs")
    store = Server(["store", "serve", "--root", str(root)], logs / "store.log")
    try:
        a = Server(["store", "agent", "--node", "n0", "--remote", store.url], logs / "agent.log")
        try:
            yield a.url
        finally:
            a.stop()
    finally:
        store.stop()


@pytest.fixture(scope="module")
def expected(llama_dir) -> list[int]:
    params = SamplingParams(max_tokens=N, ignore_eos=True)
    return LLMEngine(llama_dir).generate([PROMPT], params)[0].token_ids


def _worker(llama_dir, agent_url: str, region: ProgressiveRegion, h2d_backend, rank: int = 0,
            p: int = 1, all_card: bool = True) -> Worker:
    blocks = num_kv_blocks(ModelConfig.from_dir(llama_dir), EngineConfig())
    layers = StageLayout(scan_checkpoint(llama_dir)).stages(p)[rank].layers
    cfg = WorkerConfig(worker_id=f"w{rank}", model="tiny", rank=rank, p=p,
                       layers=(layers.start, layers.stop), all_card=all_card, agent=agent_url,
                       engine=EngineConfig(num_kv_blocks=blocks))
    return Worker(cfg, region, Timeline(f"w{rank}"), h2d_backend)


def _generate(worker: Worker, on_token=None) -> list[int]:
    items: queue.Queue = queue.Queue()
    worker.submit("r", PROMPT, SamplingParams(max_tokens=N, ignore_eos=True), items.put)
    tokens = []
    while True:
        item = items.get(timeout=60)
        assert "error" not in item, item
        tokens.append(item["token_id"])
        if on_token:
            on_token(len(tokens))
        if item["finish_reason"]:
            return tokens


@contextmanager
def _serving(worker: Worker):
    worker.start_loading()
    try:
        assert worker.weights_ready.wait(60) and worker.error is None, worker.error
        worker.connect([])
        yield worker
    finally:
        worker.stop(handover=False)


def _address(buf: memoryview) -> int:
    """The address of a buffer by another route than h2d's (a torch view, dropped at once)."""
    t = torch.frombuffer(buf, dtype=torch.uint8)
    try:
        return t.data_ptr()
    finally:
        del t


def test_region_pinned_once_async_copies_one_sync_then_unpinned_before_close(
        llama_dir, agent, expected, monkeypatch):
    fake = RecordingBackend()
    region = ProgressiveRegion.attach(agent, ImageSpec("tiny", ImageKind.FULL))
    first = _address(region.shm.buf) + region.offset + COUNTER  # the image's first byte
    # the whole pages around the image: its mapping starts on a page, the image 8 bytes in
    start = first - first % mmap.PAGESIZE
    assert start == _address(region.shm.buf)
    size = -(-(first + region.length - start) // mmap.PAGESIZE) * mmap.PAGESIZE
    close = region.close
    monkeypatch.setattr(region, "close", lambda *a, **k: (fake.log.append(("close",)),
                                                          close(*a, **k))[1])
    execute = StageRunner.execute
    monkeypatch.setattr(StageRunner, "execute",
                        lambda self, *a: (fake.log.append(("step",)), execute(self, *a))[1])
    with _serving(_worker(llama_dir, agent, region, fake)) as worker:
        assert _generate(worker) == expected
        loaded = len(worker.runner.loaded)
    kinds = fake.kinds()
    assert kinds.count("register") == 1 and fake.log[0] == ("register", start, size)
    assert fake.log[1] == ("wait", "side1", "main")  # before any copy
    copies = [e for e in fake.log if e[0] == "copy"]
    assert len(copies) >= loaded > 0
    assert set(copies) == {("copy", "side1", True, True)}  # on the side stream, from pinned bytes
    last_copy = max(i for i, k in enumerate(kinds) if k == "copy")
    assert kinds.count("sync") == 1 and fake.log[last_copy + 1] == ("sync", "side1")
    assert kinds.index("sync") < kinds.index("step")
    assert kinds.count("unregister") == 1 and fake.log[kinds.index("unregister")][1] == start
    assert kinds.index("sync") < kinds.index("unregister") < kinds.index("close")
    assert not fake.pinned
    assert region.shm.buf is None  # the mapping really closed: h2d kept no export of it


@pytest.mark.parametrize("fail", [1, AttributeError("no cudaHostRegister in this build")],
                         ids=["cudaErrorInvalidValue", "raises"])
def test_failed_registration_falls_back_to_blocking_copies_with_a_warning(
        llama_dir, agent, expected, caplog, fail):
    fake = RecordingBackend(fail=fail)
    region = ProgressiveRegion.attach(agent, ImageSpec("tiny", ImageKind.FULL))
    with caplog.at_level(logging.WARNING, "hydraserve.engine"):
        with _serving(_worker(llama_dir, agent, region, fake)) as worker:
            assert _generate(worker) == expected
    assert any("pageable" in r.getMessage() for r in caplog.records)
    kinds = fake.kinds()
    assert kinds.count("register") == 1 and "unregister" not in kinds
    assert {e for e in fake.log if e[0] == "copy"} == {("copy", "side1", False, False)}
    assert kinds.count("sync") == 1
    assert region.shm.buf is None


def test_cpu_path_is_unchanged_and_makes_no_cuda_call(llama_dir, agent, expected, monkeypatch):
    class NoCuda:
        def __init__(self, *a):
            raise AssertionError("a CUDA backend was made on CPU")

    monkeypatch.setattr(h2d, "CudaBackend", NoCuda)
    region = ProgressiveRegion.attach(agent, ImageSpec("tiny", ImageKind.FULL))
    with _serving(_worker(llama_dir, agent, region, None)) as worker:
        assert _generate(worker) == expected
        # a parameter with no packed copy still holds the image's values, copied (not viewed)
        norm = worker.runner.model.get_parameter("model.norm.weight")
        assert norm.device.type == "cpu" and norm.untyped_storage().nbytes() == norm.nbytes
    assert region.shm.buf is None


def test_consolidation_pins_the_rest_region_too(llama_dir, agent, expected):
    """Two in-process stages; the all-card head consolidates mid-stream: each of its regions
    (stage, then rest) is registered once, loaded on its own side stream, synced, unregistered."""
    fakes = [RecordingBackend(), RecordingBackend()]
    images = [ImageSpec("tiny", ImageKind.STAGE, 2, r) for r in range(2)]
    workers = [_worker(llama_dir, agent, ProgressiveRegion.attach(agent, images[r]), fakes[r],
                       rank=r, p=2, all_card=r == 0) for r in range(2)]
    try:
        for w in workers:
            w.start_loading()
        peers = [Peer(r, "127.0.0.1", w.stage_port) for r, w in enumerate(workers)]
        joins = [threading.Thread(target=w.connect, args=(peers,)) for w in workers]
        for t in joins:
            t.start()
        for t in joins:
            t.join(60)
        head = workers[0]
        tokens = _generate(head, lambda n: n == 3 and head.consolidate())
        assert tokens == expected
        assert head.rest_loaded.wait(60) and head.error is None, head.error
    finally:
        for w in workers:
            w.stop(handover=False)
    log = fakes[0].log
    regs = [e for e in log if e[0] == "register"]
    # the stage region, then the rest region (it may be mapped where the first one was)
    assert len(regs) == 2 and all(ptr % mmap.PAGESIZE == 0 and size % mmap.PAGESIZE == 0
                                  for _, ptr, size in regs)  # whole pages
    assert [e for e in log if e[0] in ("register", "sync", "unregister")] == [
        regs[0], ("sync", "side1"), ("unregister", regs[0][1]),
        regs[1], ("sync", "side2"), ("unregister", regs[1][1])]
    assert {e[1:] for e in log if e[0] == "copy"} == {("side1", True, True), ("side2", True, True)}
    assert not fakes[0].pinned and not fakes[1].pinned
