"""The six execution types of PAPER.md section 8: one system, switched by a preset."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from hydraserve.control.placement import PolicyName


class ExecType(enum.Enum):
    SERVERLESS_VLLM = "serverless_vllm"
    SERVERLESSLLM = "serverlessllm"
    SERVERLESSLLM_WITH_CACHED_MODEL = "serverlessllm_with_cached_model"
    HYDRASERVE_WITH_SINGLE_WORKER = "hydraserve_with_single_worker"
    HYDRASERVE = "hydraserve"
    HYDRASERVE_WITH_CACHE = "hydraserve_with_cache"


@dataclass(frozen=True)
class Preset:
    """(placement policy, max p, static p, prefetch, streaming load, cache, GPU sharing)."""

    policy: PolicyName
    max_p: int = 1
    static_p: int | None = None  # for PolicyName.STATIC
    prefetch: bool = True  # order the fetch before the worker exists
    streaming_load: bool = True  # load tensors while bytes arrive
    cache: bool = False  # try a node holding the whole model in host memory first
    share_gpus: bool = True  # SHARE=1 (by memory) or SHARE=0 (exclusive GPUs)
    warm_cache: bool = False  # the model is put in every server's host cache at registration


PRESETS: dict[ExecType, Preset] = {
    # naive placement, no prefetch (the fetch starts once the worker is up), load after download
    ExecType.SERVERLESS_VLLM: Preset(PolicyName.NAIVE, prefetch=False, streaming_load=False),
    # exclusive GPUs, a host-memory checkpoint pool per server, locality-aware placement
    ExecType.SERVERLESSLLM: Preset(PolicyName.NAIVE, cache=True, share_gpus=False),
    ExecType.SERVERLESSLLM_WITH_CACHED_MODEL: Preset(PolicyName.NAIVE, cache=True,
                                                     share_gpus=False, warm_cache=True),
    ExecType.HYDRASERVE_WITH_SINGLE_WORKER: Preset(PolicyName.OURS, max_p=1),
    ExecType.HYDRASERVE: Preset(PolicyName.OURS, max_p=4),
    ExecType.HYDRASERVE_WITH_CACHE: Preset(PolicyName.OURS, max_p=4, cache=True),
}


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
