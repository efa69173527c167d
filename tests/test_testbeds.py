"""The scaled testbeds and model shapes of the paper's cold-start experiment."""
from __future__ import annotations

import pytest

from hydraserve.testbeds import MODEL_SETS, PAPER_MODELS
from hydraserve.testbeds import testbed as make_testbed


def _fp16_bytes(m) -> float:
    hd = m.hidden // m.heads
    if m.arch == "opt":
        layer = 4 * m.hidden * m.hidden + 2 * m.hidden * m.intermediate
        return 2 * (m.layers * layer + m.vocab * m.hidden)
    if m.arch == "falcon":  # fused qkv of kv_heads key and value heads, tied embeddings
        layer = (m.hidden * (m.hidden + 2 * m.kv_heads * hd) + m.hidden * m.hidden
                 + 2 * m.hidden * m.intermediate)
        return 2 * (m.layers * layer + m.vocab * m.hidden)
    layer = (m.hidden * (m.hidden + 2 * m.kv_heads * hd) + m.hidden * m.hidden
             + 3 * m.hidden * m.intermediate)
    return 2 * (m.layers * layer + 2 * m.vocab * m.hidden)


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_scaled_models_are_the_papers_size_over_100(name):
    m = PAPER_MODELS[name]
    assert abs(_fp16_bytes(m) / (m.paper_gb * 1e9 / 100) - 1) < 0.15


def test_testbeds():
    a10, v100 = make_testbed("a10"), make_testbed("v100")
    assert len(a10.servers) == 4 and a10.servers[0].gpus == (22.0,)
    assert v100.servers[0].gpus == (32.0,) * 4 and v100.servers[0].nic_gbps == 16.0
    assert a10.scale.size_scale == 100 and a10.egress_gbps == 64.0
    assert set(MODEL_SETS[0]) | set(MODEL_SETS[1]) <= set(PAPER_MODELS)
    with pytest.raises(ValueError):
        make_testbed("h100")


def _experiment():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "run_figure7_expr", __file__.replace("tests/test_testbeds.py", "ae_scripts/run_figure7_expr.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_figure7_expr"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_results_rows_are_merged_not_duplicated(tmp_path):
    import csv

    mod = _experiment()
    row = {k: "" for k in mod.FIELDS}
    a = {**row, "exec_type": "hydraserve", "model": "OPT-2.7B", "backend": "a10", "ttft_s": 5}
    b = {**a, "model": "Llama2-7B", "ttft_s": 6}
    out = tmp_path / "a10.csv"
    mod.save([a, b], out)
    mod.save([{**a, "ttft_s": 4}], out)
    rows = list(csv.DictReader(open(out)))
    assert [(r["model"], r["ttft_s"]) for r in rows] == [("Llama2-7B", "6"), ("OPT-2.7B", "4")]


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_head_sizes_run_on_vllms_cpu_attention(name):
    """vLLM's CPU attention takes head sizes 32, 64, 80, 96, 112, 128, ... only: the stand-ins
    must use one so that the real vLLM serves them in the cold-start experiment."""
    m = PAPER_MODELS[name]
    assert m.hidden % m.heads == 0 and m.hidden // m.heads in (32, 64, 80, 96, 112, 128)


def test_experiment_rows_map_to_serve_flags_and_paper_sizes(tmp_path):
    import yaml

    mod = _experiment()
    assert mod.serve_args("vllm", "/py") == ["--exec-type", "serverless_vllm", "--engine", "vllm",
                                             "--vllm-python", "/py"]
    assert mod.serve_args("hydraserve") == ["--exec-type", "hydraserve", "--static-p", "4"]
    assert mod.serve_args("serverlessllm") == ["--exec-type", "serverlessllm"]
    cluster, models = mod.write_configs(tmp_path, "v100", ["OPT-2.7B"], "serverlessllm",
                                        tmp_path / "models")
    entry = yaml.safe_load(models.read_text())["models"][0]
    assert entry["size_gb"] == 7 and entry["ttft_slo_s"] == 7.5  # placement uses the paper's size
    c = yaml.safe_load(cluster.read_text())
    assert c["share"] is False and len(c["servers"]) == 4  # ServerlessLLM: exclusive GPUs
