"""The scaled testbeds' emulated GPU costs of a stock vLLM engine (`ScaleConfig.emulate_gpu_costs`):
which worker specs the control plane gives them (per preset and GPU kind, never without the
switch), how they travel (flags, cluster YAML), and a real worker that sleeps its profiling pass
and paces its load."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hydraserve.cli import build_parser
from hydraserve.cluster.local import LocalCluster
from hydraserve.cluster.pipeline import GroupConfig, LocalPipeline
from hydraserve.config import (ConfigError, GatewayConfig, ScaleConfig, cluster_from_dict,
                               cluster_to_dict)
from hydraserve.control.controller import Controller
from hydraserve.control.gpu import Claim
from hydraserve.control.instance import Stage
from hydraserve.control.presets import ExecType, emulated_gpu_costs, preset
from hydraserve.protocol import WorkerSpec, worker_args
from hydraserve.sim.costmodel import CostModel
from hydraserve import testbeds
from hydraserve.testbeds import GPUS, VLLM_LOADER_SLOWDOWN
from hydraserve.worker.commands import spec_from_args

STREAMING = (ExecType.HYDRASERVE, ExecType.HYDRASERVE_WITH_SINGLE_WORKER,
             ExecType.HYDRASERVE_WITH_CACHE)


def _spec_on(cluster_cfg, exec_type: ExecType, node: str, engine: str = "hydraserve"):
    """The worker spec the control plane builds for a one-stage instance on ``node``."""
    backend = LocalCluster(cluster_cfg)  # never started: no processes
    try:
        c = Controller(backend, cluster_cfg, GatewayConfig(engine=engine), preset(exec_type))
        stage = Stage(0, node, True, Claim(0, node, 0, 12.0), "m-r0", layers=(0, 4))
        ep = SimpleNamespace(name="m", num_kv_blocks=64)
        inst = SimpleNamespace(id="m-0", placement=SimpleNamespace(p=1))
        return c.fleet.spec(ep, inst, stage)
    finally:
        backend.close()


@pytest.mark.parametrize("gpu", ["a10", "v100"])
def test_the_control_plane_asks_stock_engines_for_the_simulators_gpu_costs(gpu):
    cfg = testbeds.testbed(gpu)
    assert cfg.scale.emulate_gpu_costs
    cost = CostModel.gpu_default().on(gpu)  # what the simulator times a GPU host with
    pcie = GPUS[gpu].pcie_gbs
    vllm = _spec_on(cfg, ExecType.SERVERLESS_VLLM, f"{gpu}-1")
    assert vllm.profile_s == cost.profile_s > 0
    assert vllm.load_gbs == pytest.approx(pcie / VLLM_LOADER_SLOWDOWN)
    assert vllm.load_gbs == pytest.approx(pcie / cost.vllm_loader_slowdown)
    assert vllm.size_scale == cfg.scale.size_scale == 100.0
    for et in (ExecType.SERVERLESSLLM, ExecType.SERVERLESSLLM_WITH_CACHED_MODEL):
        sllm = _spec_on(cfg, et, f"{gpu}-0")
        assert (sllm.profile_s, sllm.load_gbs) == (cost.profile_s, pcie)
    for et in STREAMING:  # HydraServe's streaming load: nothing emulated
        spec = _spec_on(cfg, et, f"{gpu}-0")
        assert (spec.profile_s, spec.load_gbs) == (None, None), et


def test_nothing_is_emulated_without_the_switch_or_a_known_gpu():
    off = dataclasses.replace(testbeds.testbed("a10"), scale=ScaleConfig(size_scale=100.0))
    spec = _spec_on(off, ExecType.SERVERLESS_VLLM, "a10-0")
    assert (spec.profile_s, spec.load_gbs) == (None, None)
    # the genuine vLLM profiles and loads for real
    spec = _spec_on(testbeds.testbed("a10"), ExecType.SERVERLESS_VLLM, "a10-0", engine="vllm")
    assert (spec.profile_s, spec.load_gbs) == (None, None)
    for et in ExecType:
        assert emulated_gpu_costs(preset(et), "cpu") == (None, None)
    assert ScaleConfig().emulate_gpu_costs is False


def test_the_switch_and_the_fields_travel():
    cfg = testbeds.testbed("v100")
    assert cluster_from_dict(cluster_to_dict(cfg)) == cfg
    d = cluster_to_dict(cfg)
    with pytest.raises(ConfigError, match="emulate_gpu_costs"):
        cluster_from_dict({**d, "scale": {**d["scale"], "emulate_gpu_costs": "yes"}})
    spec = WorkerSpec(worker_id="m-r0", model="m", node="", rank=0, p=1, layers=(0, 4),
                      all_card=True, num_kv_blocks=8, streaming_load=False, size_scale=100.0,
                      profile_s=3.4, load_gbs=12.0 / VLLM_LOADER_SLOWDOWN)
    args = build_parser().parse_args(worker_args(spec, "http://agent:1"))
    assert spec_from_args(args) == spec
    assert WorkerSpec.from_json(spec.to_json()) == spec


PACED_LOAD_S = 3.0  # the emulated copy's length in the paced test


class _Emulating(LocalPipeline):
    """A one-worker pipeline whose spec asks for the emulated costs."""

    def __init__(self, cfg: GroupConfig, **emulation):
        super().__init__(cfg)
        self.emulation = emulation

    def _specs(self) -> list[WorkerSpec]:
        return [dataclasses.replace(s, **self.emulation) for s in super()._specs()]


@pytest.mark.multiprocess
def test_a_worker_paces_its_load_and_sleeps_its_profiling_pass(llama_dir):
    weights = sum(f.stat().st_size for f in Path(llama_dir).glob("*.safetensors"))
    assert weights > 0
    scale, load_s, profile_s = 100.0, PACED_LOAD_S, 1.0
    rate = weights * scale / 1e9 / load_s  # the paper's GB/s that make the copy last load_s
    with _Emulating(GroupConfig(llama_dir, threads_per_worker=1), size_scale=scale,
                    profile_s=profile_s, load_gbs=rate) as pipe:
        items = list(pipe.generate([5, 9, 13], max_tokens=2, ignore_eos=True))
        assert all("error" not in it for it in items), items
        t = pipe.health(0)["timeline"]
    # the copy starts after the imports (the loader thread is started then) and lasts at least
    # the tensors' bytes (the region holds them and more) at the emulated rate
    assert t["weights_ready"] - t["imports_done"] >= load_s - 0.01, t
    assert t["weights_ready"] <= t["profiled"] <= t["engine_ready"], t
    assert t["profiled"] - t["weights_ready"] >= profile_s - 0.01, t
    assert t["engine_ready"] - t["spawned"] >= load_s + profile_s - 0.02, t


@pytest.mark.multiprocess
def test_a_worker_without_emulation_neither_paces_nor_profiles(llama_dir):
    with LocalPipeline(GroupConfig(llama_dir, threads_per_worker=1)) as pipe:
        # the pipeline is up once its ring is; a first step waits for the weights
        items = list(pipe.generate([5, 9, 13], max_tokens=1))
        assert all("error" not in it for it in items), items
        t = pipe.health(0)["timeline"]
    assert "profiled" not in t
    # the paced test's bound means something: unpaced, the load takes far less (0.2-0.5 s on
    # the 2-core machines; the bound leaves room for a loaded one)
    assert t["weights_ready"] - t["imports_done"] < PACED_LOAD_S / 2, t
