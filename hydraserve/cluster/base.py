"""The cluster backend protocol: the control plane starts and stops workers only through it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hydraserve.config import ServerConfig


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a backend needs to start one ``hydraserve worker``."""

    worker_id: str
    model: str
    node: str
    rank: int
    p: int
    layers: tuple[int, int]
    all_card: bool
    num_kv_blocks: int
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int = 3072
    block_size: int = 16
    max_num_seqs: int = 64
    threads: int | None = None  # torch CPU threads (None: torch's default)
    late_attach: bool = False  # baseline: fetch only once the worker is up
    streaming_load: bool = True  # baseline off: wait for every byte, then load
    gpu_memory_gb: float | None = None  # the claim, in real GB (enforced on CUDA)
    engine: str = "hydraserve"  # or "vllm": the genuine vLLM server (p = 1)
    vllm_python: str | None = None


def worker_args(spec: WorkerSpec, agent_url: str) -> list[str]:
    """The ``hydraserve worker`` command line for ``spec`` (every backend starts the same)."""
    args = ["worker", "--model", spec.model, "--rank", str(spec.rank), "--pipeline", str(spec.p),
            "--layers", "%d:%d" % spec.layers, "--agent", agent_url, "--worker-id",
            spec.worker_id, "--num-kv-blocks", str(spec.num_kv_blocks), "--device", spec.device,
            "--dtype", spec.dtype, "--block-size", str(spec.block_size), "--max-num-seqs",
            str(spec.max_num_seqs), "--max-model-len", str(spec.max_model_len)]
    if spec.all_card:
        args.append("--all-card")
    if spec.late_attach:
        args.append("--late-attach")
    if not spec.streaming_load:
        args.append("--no-streaming-load")
    if spec.gpu_memory_gb:
        args += ["--gpu-memory-gb", str(spec.gpu_memory_gb)]
    if spec.threads:
        args += ["--threads", str(spec.threads)]
    if spec.engine != "hydraserve":
        args += ["--engine", spec.engine]
        if spec.vllm_python:
            args += ["--vllm-python", spec.vllm_python]
    return args


class ClusterBackend(Protocol):
    """What the control plane and the gateway call on a cluster. ``start`` and ``close`` may
    block (processes, API calls): async callers run them in an executor."""

    def start(self) -> None:
        """Bring up the cluster's shared services (store, agents); workers come later."""

    def nodes(self) -> tuple[ServerConfig, ...]: ...

    def store_url(self) -> str: ...

    def agent_url(self, node: str) -> str: ...

    def agent_urls(self) -> dict[str, str]: ...

    def register_model(self, name: str, path: str) -> None: ...

    def unregister_model(self, name: str) -> None: ...

    def start_worker(self, spec: WorkerSpec) -> None:
        """Begin starting the worker; returns without waiting for it."""

    def wait_worker(self, worker_id: str, timeout: float) -> str:
        """Block until the worker serves its control API; return its URL."""

    def stop_worker(self, worker_id: str) -> None: ...

    def worker_alive(self, worker_id: str) -> bool: ...

    def close(self) -> None: ...
