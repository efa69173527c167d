"""How long each step of a simulated worker takes, with the source of every constant.

Fetch times are not here: they come from the fluid network model (bytes over the shared NIC
and the store's egress, `network.py`); the GPUs' own facts are the testbeds'
(`hydraserve.testbeds`: GPUS, VLLM_LOADER_SLOWDOWN, STOCK_PROFILE_S). Everything else is
below. Nothing is fitted to the
paper's results; "our choice" marks a constant with no better source.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# the GPUs (GpuSpec, GPUS), the stock loader's slowdown and the stock engine's profiling pass
# are the testbeds' facts (hydraserve/testbeds.py, with their sources): the control plane reads
# them too, for the scaled testbeds' emulated GPU costs
from hydraserve.testbeds import (GPUS, STOCK_PROFILE_S, VLLM_LOADER_SLOWDOWN,  # noqa: F401
                                 GpuSpec, gpu_kind_of)


@dataclass(frozen=True)
class CostModel:
    """Start-up and compute times of a simulated worker.

    ``process_s``: container/process start until the control API answers (before the heavy
    imports); ``import_s``: the heavy imports and device context, overlapped with the fetch on
    HydraServe's path; ``engine_init_s``: everything after the weights are on the GPU until the
    engine serves (building the engine, the KV cache); ``profile_s``: a stock vLLM engine's
    profiling pass and CUDA-graph capture (Serverless vLLM and ServerlessLLM, whose runtime is
    vLLM; HydraServe skips both, PAPER.md 2.3); ``vllm_loader_slowdown``: a stock vLLM load
    after the download runs at PCIe / this (see `VLLM_LOADER_SLOWDOWN`); ``hop_ms``: one
    pipeline hop (PAPER.md 3: 1 ms per extra stage); ``migrate_s``: KV migration at
    consolidation; ``request_s``: the gateway's path from a request to its worker and back.
    ``by_gpu``: per GPU kind, the fields whose value differs on that kind's hosts
    (`on`)."""

    process_s: float = 1.0
    import_s: float = 4.0
    engine_init_s: float = 0.5
    profile_s: float = 3.0
    vllm_loader_slowdown: float = 1.0
    hop_ms: float = 1.0
    migrate_s: float = 0.1
    request_s: float = 0.05
    decode_efficiency: float = 1.0  # share of the roofline reached (1.0: the roofline itself)
    shared_cores: int | None = None  # all servers' imports share this many cores (one machine)
    by_gpu: dict = field(default_factory=dict, compare=False)

    def on(self, gpu_kind: str) -> "CostModel":
        """This cost model on a host of ``gpu_kind`` (its `by_gpu` values applied)."""
        return dataclasses.replace(self, **self.by_gpu.get(gpu_kind, {}), by_gpu={})

    @staticmethod
    def gpu_default() -> "CostModel":
        """GPU servers (the paper's A10 and V100 hosts; other kinds: the defaults above, our
        choice; so are process_s, of which only the sum with import_s matters to a start, and
        migrate_s). Sourced: hop_ms (PAPER.md 3); vllm_loader_slowdown (ServerlessLLM's paper,
        above); engine_init_s on the A10 hosts: the paper's own constant for everything after
        the fetch, 2000 ms (PAPER.md 3), less request_s. Fitted, because only Figure 7 tells
        them (PAPER.md 1 bounds the whole cold start only), on half of its models (the fit
        half: OPT-2.7B and Llama2-7B on both GPUs, OPT-13B on the V100; the other half,
        OPT-6.7B, Llama3-8B, Falcon-7B, Llama2-13B, is held out; results/sim-validation.md
        reports both halves), each as the mean over the fit half of the bar less the sourced
        and already fitted parts of its start (`SimWorker._boot`; fetch at 16 Gbps of the
        checkpoint's bytes, request_s), in this order (ae_scripts/sim_validation.py's `fit`
        recomputes them):
        - engine_init_s on the V100 hosts: HydraServe single worker where the fetch bounds its
          start (Llama2-7B, OPT-13B): bar - fetch - request_s -> 3.6 s.
        - import_s (worker start = process_s + import_s): HydraServe static p = 4, whose
          stages fetch a quarter and so wait for their own start: bar - engine_init_s -
          process_s - request_s: A10 2.2 s, V100 3.4 s.
        - profile_s: the Serverless vLLM and ServerlessLLM (cached and not) bars less every
          other part of their start: A10 1.7 s (six bars, 1.1-2.4 s), V100 3.4 s (nine bars,
          1.7-6.7 s)."""
        return CostModel(by_gpu={
            "a10": {"import_s": 2.2, "engine_init_s": 1.95, "profile_s": STOCK_PROFILE_S["a10"],
                    "vllm_loader_slowdown": VLLM_LOADER_SLOWDOWN},
            "v100": {"import_s": 3.4, "engine_init_s": 3.6, "profile_s": STOCK_PROFILE_S["v100"],
                     "vllm_loader_slowdown": VLLM_LOADER_SLOWDOWN}})

    @staticmethod
    def local_cpu() -> "CostModel":
        """The scaled local testbed on this project's 2-core development machine, from our own
        workers' timelines (results/figure7/a10.csv, single-worker rows: spawned -> imports done
        ~2.0 s of one core, weights -> engine ready ~0.05 s, engine ready -> first token
        ~0.08 s). Every emulated server is the same machine: concurrent imports share its 2
        cores (one core each at most). Use with ``device="cpu"`` (the `GPUS["cpu"]` spec).
        Our workers have no profiling pass and one loader (memory speed) of their own
        (profile_s 0, the CPU's "PCIe"); on the scaled testbeds (`ScaleConfig.emulate_gpu_costs`)
        the control plane asks the workers of the stock-engine presets to emulate the GPU's:
        `gpu_default`'s profile_s of the server's GPU kind and its loader rate (PCIe, over
        `VLLM_LOADER_SLOWDOWN` for vLLM's loader), in their `WorkerSpec` (profile_s, load_gbs;
        `hydraserve.control.presets.emulated_gpu_costs`). A simulated worker takes both from
        its spec as the real one does (`SimWorker._boot`), so the values are not repeated
        here."""
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
