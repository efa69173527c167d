"""The paper's cold-start testbeds and model sets, scaled by 1/100 for the local cluster.

Sizes stay in the paper's units (GB, Gbps) and the cluster's ``size_scale`` of 100 maps them to
what really moves: a 13 GB model is a ~130 MB checkpoint and a 16 Gbps NIC really carries
0.16 Gbps, so fetch times in seconds are the paper's (PAPER.md sections 9 and 10).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

from hydraserve.config import ClusterConfig, ScaleConfig, ServerConfig

SCALE = 100.0


# -- the servers' GPUs (read by the simulator's cost model and, for the scaled testbeds' CPU
# stand-ins, by the control plane: `ScaleConfig.emulate_gpu_costs`) ---------------------------

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


def gpu_kind_of(server: str) -> str:
    """The GPU kind of a server named after it (a10-*, v100-*, as the testbeds name theirs);
    anything else: "cpu"."""
    prefix = server.split("-")[0].lower()
    return prefix if prefix in GPUS else "cpu"


# ServerlessLLM (Fu et al., OSDI'24): its checkpoint loader is 3.6x-8.2x faster than the PyTorch
# and Safetensors loaders (its loading microbenchmarks), and it runs at the bandwidth of the tier
# it reads (host memory -> GPU: PCIe). vLLM 0.4.2 loads with those stock loaders (the file to
# host memory, then each tensor to the GPU), so we take the middle of that range: a stock load
# runs at PCIe / 5.9.
VLLM_LOADER_SLOWDOWN = (3.6 + 8.2) / 2

# A stock vLLM engine's profiling pass and CUDA-graph capture, seconds per GPU kind: fitted on
# half of Figure 7's bars (the Serverless vLLM and ServerlessLLM ones less every other part of
# their start; `CostModel.gpu_default` says how, ae_scripts/sim_validation.py recomputes it).
STOCK_PROFILE_S = {"a10": 1.7, "v100": 3.4}


TESTBEDS = ("a10", "v100", "hybrid")


def testbed(name: str, share: bool = True) -> ClusterConfig:
    """``a10``: 4 x ecs.gn7i-c32g1.8xlarge (one A10, 22 GB usable, 16 Gbps, 188 GB host);
    ``v100``: 4 x ecs.gn6e-c12g1.12xlarge (four 32 GB V100, 16 Gbps, 368 GB host); two storage
    servers of 32 Gbps in front of either (the cold-start experiment). ``hybrid`` (the
    end-to-end experiment): 2 x ecs.gn7i-c32g1.32xlarge (four A10, 64 Gbps, 752 GB host) and
    4 x ecs.gn6e-c12g1.12xlarge behind 6 storage servers of 32 Gbps (PAPER.md section 9).
    The servers are CPU stand-ins for their GPUs: the baselines' stock-engine costs that a CPU
    does not show are emulated (`ScaleConfig.emulate_gpu_costs`)."""
    egress = 64.0
    if name == "a10":
        servers = tuple(ServerConfig(f"a10-{i}", (22.0,), 16.0, 188.0) for i in range(4))
    elif name == "v100":
        servers = tuple(ServerConfig(f"v100-{i}", (32.0,) * 4, 16.0, 368.0) for i in range(4))
    elif name == "hybrid":
        servers = tuple(ServerConfig(f"a10-{i}", (22.0,) * 4, 64.0, 752.0) for i in range(2)) + \
            tuple(ServerConfig(f"v100-{i}", (32.0,) * 4, 16.0, 368.0) for i in range(4))
        egress = 6 * 32.0
    else:
        raise ValueError(f"unknown testbed {name!r}; choose one of {', '.join(TESTBEDS)}")
    return ClusterConfig(servers=servers, device="cpu", share=share, egress_gbps=egress,
                         scale=ScaleConfig(size_scale=SCALE, emulate_gpu_costs=True))


def with_host_caches(cfg: ClusterConfig, fraction: float = 0.25) -> ClusterConfig:
    """``cfg`` with a host-memory model cache of ``fraction`` of each server's host memory
    (our choice; `hydraserve serve` zeroes it for execution types without a cache)."""
    return dataclasses.replace(cfg, servers=tuple(
        dataclasses.replace(s, cache_gb=s.host_memory_gb * fraction) for s in cfg.servers))


@dataclass(frozen=True)
class PaperModel:
    """A scaled stand-in for one of the paper's models: its family and layer count, a hidden
    size chosen so the float16 checkpoint is the paper's size / 100."""

    name: str  # as in the paper's figures
    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    paper_gb: float

    def make(self, root: str | Path) -> Path:
        from hydraserve.make_model import ModelSpec, make_model

        path = Path(root) / self.name
        if not self._made(path):
            if path.exists():  # an older shape of this stand-in: make it anew
                shutil.rmtree(path)
            make_model(path, ModelSpec(arch=self.arch, hidden=self.hidden, layers=self.layers,
                                       heads=self.heads, kv_heads=self.kv_heads,
                                       intermediate=self.intermediate, vocab=self.vocab,
                                       dtype="float16", seed=zlib.crc32(self.name.encode()) % 1000))
        return path

    def _made(self, path: Path) -> bool:
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return (cfg.get("hidden_size"), cfg.get("num_hidden_layers"),
                cfg.get("num_attention_heads"), cfg.get("vocab_size")) == \
            (self.hidden, self.layers, self.heads, self.vocab) and \
            cfg.get("num_key_value_heads", self.kv_heads) == self.kv_heads


# float16 bytes ~= paper_gb * 1e9 / 100 (checked by tests/test_testbeds.py within 15%); head
# sizes (32, 64, 80) are ones vLLM's CPU attention supports, so the real vLLM runs them too
PAPER_MODELS = {
    "OPT-2.7B": PaperModel("OPT-2.7B", "opt", 32, 288, 9, 9, 1152, 16384, 7),
    "OPT-6.7B": PaperModel("OPT-6.7B", "opt", 32, 384, 6, 6, 1536, 16384, 13),
    "OPT-13B": PaperModel("OPT-13B", "opt", 40, 512, 8, 8, 2048, 16384, 26),
    "Llama2-7B": PaperModel("Llama2-7B", "llama", 32, 384, 6, 6, 1024, 16384, 13),
    "Llama2-13B": PaperModel("Llama2-13B", "llama", 40, 480, 6, 6, 1280, 16384, 26),
    "Llama3-8B": PaperModel("Llama3-8B", "llama", 32, 384, 12, 3, 1040, 32768, 15),
    # one kv head (kv_heads 1) is Falcon-7B's multi-query attention
    "Falcon-7B": PaperModel("Falcon-7B", "falcon", 32, 448, 7, 1, 1792, 8192, 13),
}
MODEL_SETS = {0: ("OPT-2.7B", "OPT-6.7B", "Llama2-7B", "Llama3-8B", "Falcon-7B"),
              1: ("OPT-13B", "Llama2-13B"),
              3: ("Llama2-13B", "Llama2-7B")}  # the end-to-end set: 64 replicas per application
# the end-to-end experiment's model sizes (PAPER.md 10: Llama-2-13B counts as 25 GB there)
END2END_GB = {"Llama2-13B": 25.0, "Llama2-7B": 13.0}
