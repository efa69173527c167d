"""How long each step of a simulated worker takes, with the source of every constant.

Fetch times are not here: they come from the fluid network model (bytes over the shared NIC
and the store's egress, `network.py`). Everything else is below. Nothing is fitted to the
paper's results; "our choice" marks a constant with no better source.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    name: str
    mem_bw_gbs: float  # GB/s
    fp16_tflops: float  # dense tensor-core FP16
    pcie_gbs: float  # host-to-GPU copy, GB/s in practice


# NVIDIA datasheets: A10 600 GB/s GDDR6, 125 TFLOPS FP16 tensor; V100 SXM2 900 GB/s HBM2,
# 125 TFLOPS. PCIe in practice (PAPER.md 9): A10 hosts Gen4 x16 ~25 GB/s, V100 hosts Gen3 ~12.
GPUS = {"a10": GpuSpec("A10", 600.0, 125.0, 25.0),
        "v100": GpuSpec("V100", 900.0, 125.0, 12.0),
        # The local testbed's "GPUs" are this machine's CPU running 1/100-size stand-ins, in
        # the paper's units: a 13 GB stand-in decodes a token in ~45 ms (results/figure7,
        # p = 1 TPOT) -> 13 / 0.045 ~ 290 "GB/s"; loading the arrived bytes took ~0.05 s ->
        # ~260 "GB/s"; prefill ~500 tokens/s of a 100M-parameter float32 model
        # (benchmarks/engine.py) -> 2 x 6.5e9 x 500 / 1e12 = 6.5 "TFLOPS".
        "cpu": GpuSpec("CPU", 290.0, 6.5, 260.0)}


@dataclass(frozen=True)
class CostModel:
    """Start-up and compute times of a simulated worker.

    ``process_s``: container/process start until the control API answers (before the heavy
    imports); ``import_s``: the heavy imports and device context, overlapped with the fetch on
    HydraServe's path; ``engine_init_s``: building the engine around the loaded weights;
    ``profile_s``: the baseline's profiling pass and warm-up (Serverless vLLM only: HydraServe
    skips it, PAPER.md 2.3); ``hop_ms``: one pipeline hop (PAPER.md 3: 1 ms per extra stage);
    ``migrate_s``: KV migration at consolidation; ``request_s``: the gateway's path from a
    request to its worker and back."""

    process_s: float = 1.0
    import_s: float = 4.0
    engine_init_s: float = 0.5
    profile_s: float = 3.0
    hop_ms: float = 1.0
    migrate_s: float = 0.1
    request_s: float = 0.05
    decode_efficiency: float = 1.0  # share of the roofline reached (1.0: the roofline itself)
    shared_cores: int | None = None  # all servers' imports share this many cores (one machine)

    @staticmethod
    def gpu_default() -> "CostModel":
        """GPU servers. process_s, import_s, engine_init_s, profile_s, migrate_s: our choice
        (a container start, `import torch` plus vLLM-class libraries and CUDA context creation
        take seconds on such hosts; PAPER.md 1 only bounds the whole cold start, 17-40 s for
        Serverless vLLM, of which the fetch is 6.5-13 s); hop_ms: PAPER.md 3."""
        return CostModel()

    @staticmethod
    def local_cpu() -> "CostModel":
        """The scaled local testbed on this project's 2-core development machine, from our own
        workers' timelines (results/figure7/a10.csv, single-worker rows: spawned -> imports done
        ~2.0 s of one core, weights -> engine ready ~0.05 s, engine ready -> first token
        ~0.08 s). Every emulated server is the same machine: concurrent imports share its 2
        cores (one core each at most). Use with ``device="cpu"`` (the `GPUS["cpu"]` spec)."""
        return CostModel(process_s=0.3, import_s=1.7, engine_init_s=0.05, profile_s=0.0,
                         hop_ms=1.0, migrate_s=0.2, request_s=0.1, shared_cores=2)


@dataclass(frozen=True)
class ModelShape:
    """What the compute model needs of a model: its weight bytes and parameter count."""

    name: str
    size_gb: float  # fp16 weights, GB (paper units)
    num_layers: int

    @property
    def params(self) -> float:
        return self.size_gb * 1e9 / 2  # fp16: 2 bytes per parameter


def decode_s(shape: ModelShape, batch: int, gpu: GpuSpec, cost: CostModel) -> float:
    """One decode step for ``batch`` sequences: the larger of reading every weight once and
    2 FLOPs per parameter per sequence (roofline), over the efficiency."""
    read = shape.size_gb / gpu.mem_bw_gbs
    flops = 2 * shape.params * batch / (gpu.fp16_tflops * 1e12)
    return max(read, flops) / cost.decode_efficiency


def prefill_s(shape: ModelShape, tokens: int, gpu: GpuSpec, cost: CostModel) -> float:
    """A prefill of ``tokens`` prompt tokens (the same roofline with batch = tokens)."""
    return decode_s(shape, max(1, tokens), gpu, cost)
