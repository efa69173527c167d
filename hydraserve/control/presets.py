"""The six execution types of PAPER.md section 8: one system, switched by a preset."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from hydraserve.control.placement import PolicyName
from hydraserve.testbeds import GPUS, STOCK_PROFILE_S, VLLM_LOADER_SLOWDOWN


class ExecType(enum.Enum):
    SERVERLESS_VLLM = "serverless_vllm"
    SERVERLESSLLM = "serverlessllm"
    SERVERLESSLLM_WITH_CACHED_MODEL = "serverlessllm_with_cached_model"
    HYDRASERVE_WITH_SINGLE_WORKER = "hydraserve_with_single_worker"
    HYDRASERVE = "hydraserve"
    HYDRASERVE_WITH_CACHE = "hydraserve_with_cache"


@dataclass(frozen=True)
class Preset:
    """(placement policy, max p, static p, prefetch, streaming load, cache, GPU sharing, start
    after the fetch)."""

    policy: PolicyName
    max_p: int = 1
    static_p: int | None = None  # for PolicyName.STATIC
    prefetch: bool = True  # order the fetch before the worker exists
    streaming_load: bool = True  # load tensors while bytes arrive
    cache: bool = False  # try a node holding the whole model in host memory first
    share_gpus: bool = True  # SHARE=1 (by memory) or SHARE=0 (exclusive GPUs)
    warm_cache: bool = False  # the model is put in every server's host cache at registration
    # the worker is started only once its node holds the whole checkpoint in host memory (the
    # control plane waits for the prefetch to complete; a cached checkpoint skips the download)
    start_after_fetch: bool = False

    @property
    def stock_engine(self) -> bool:
        """Its runtime is a stock vLLM engine (Serverless vLLM, ServerlessLLM): it loads only
        after the download, with a stock loader, and runs vLLM's profiling pass; HydraServe's
        streaming load skips both (PAPER.md 2.3)."""
        return not self.streaming_load


PRESETS: dict[ExecType, Preset] = {
    # naive placement, no prefetch (the fetch starts once the worker is up), load after download
    ExecType.SERVERLESS_VLLM: Preset(PolicyName.NAIVE, prefetch=False, streaming_load=False),
    # ServerlessLLM (Fu et al., OSDI'24), as HydraServe ran it (PAPER.md 8): exclusive GPUs, a
    # host-memory checkpoint pool per server, locality-aware placement (cache). Its start
    # (ServerlessLLM paper, sections 4-6: a checkpoint not on the server is first downloaded
    # into the server's storage tiers; the instance then loads it from there with its own
    # multi-tier loader): the runtime starts only once the checkpoint is in host memory
    # (start_after_fetch), then its loader copies the whole checkpoint host -> GPU, no
    # streaming from the network (streaming_load=False; the simulated worker times that copy
    # at PCIe speed, the loader's claim of saturating the tier's bandwidth). Its runtime is a
    # stock vLLM engine (profiling pass on, like Serverless vLLM's). "cached": the checkpoint
    # is in every server's host memory already (no download).
    ExecType.SERVERLESSLLM: Preset(PolicyName.NAIVE, cache=True, share_gpus=False,
                                   streaming_load=False, start_after_fetch=True),
    ExecType.SERVERLESSLLM_WITH_CACHED_MODEL: Preset(PolicyName.NAIVE, cache=True,
                                                     share_gpus=False, warm_cache=True,
                                                     streaming_load=False,
                                                     start_after_fetch=True),
    ExecType.HYDRASERVE_WITH_SINGLE_WORKER: Preset(PolicyName.OURS, max_p=1),
    ExecType.HYDRASERVE: Preset(PolicyName.OURS, max_p=4),
    ExecType.HYDRASERVE_WITH_CACHE: Preset(PolicyName.OURS, max_p=4, cache=True),
}


def emulated_gpu_costs(p: Preset, gpu: str) -> tuple[float | None, float | None]:
    """(profile_s, load_gbs) that a CPU stand-in for a server with a ``gpu`` ("a10", "v100")
    emulates under ``p`` (`WorkerSpec`'s fields; a scaled testbed only), with the simulator's
    constants for that GPU (`CostModel.gpu_default`): the stock engine's profiling pass, and
    its loader's rate: PCIe for ServerlessLLM's loader (it reads the checkpoint from host
    memory), PCIe / VLLM_LOADER_SLOWDOWN for vLLM's stock loader after its own download
    (Serverless vLLM: no prefetch). (None, None) for the streaming presets and for a kind
    without those constants ("cpu")."""
    if not p.stock_engine or gpu not in STOCK_PROFILE_S:
        return None, None
    pcie = GPUS[gpu].pcie_gbs
    return STOCK_PROFILE_S[gpu], pcie if p.prefetch else pcie / VLLM_LOADER_SLOWDOWN


def preset(name: str | ExecType) -> Preset:
    try:
        return PRESETS[ExecType(name)]
    except ValueError:
        choices = ", ".join(e.value for e in ExecType)
        raise ValueError(f"unknown execution type {name!r}; choose one of {choices}") from None


def resolve(exec_type: str | ExecType, static_p: int | None = None) -> Preset:
    """The preset of ``exec_type``; with ``static_p``, its placement replaced by the static
    policy at that p (the paper's fixed-p runs)."""
    p = preset(exec_type)
    if static_p:
        p = dataclasses.replace(p, policy=PolicyName.STATIC, static_p=static_p, max_p=static_p)
    return p
