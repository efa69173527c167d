"""ae_scripts/figure7.py: the paper's values load whole, and the script plots and tabulates
synthetic measurements (and none at all) without a display."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ae_scripts" / "figure7.py"
PAPER = ROOT / "results" / "paper" / "figure7.csv"
HEADER = "exec_type,model,backend,ttft_s,tpot_ms,trials,queue_s,fetch_s,load_s,init_s,first_token_s"

A10 = [
    "serverless_vllm,Llama2-7B,a10,10.0,40.1,10.0;10.0;12.5,0.1,6.0,2.0,1.5,0.4",
    "hydraserve,Llama2-7B,a10,4.0,43.0,4.0;4.0;4.4,0.1,3.2,,0.5,0.2",
    "hydraserve_with_single_worker,Llama2-7B,a10,,,6.0;7.0;9.0,,,,,",
    "vllm,Llama2-7B,a10,8.0,35.0,8.0;8.0,,5.0,1.0,,",
    "hydraserve,OPT-2.7B,a10,3.0,30.0,3.0;3.0;3.0,,,,,",
]
V100 = [
    "serverless_vllm,OPT-13B,v100,30.0,,30.0;30.0;31.0,0.2,20.0,6.0,3.0,0.8",
    "hydraserve,OPT-13B,v100,7.5,,7.5;7.5;8.0,0.2,5.0,4.0,1.0,0.3",
]


def _load_module():
    spec = importlib.util.spec_from_file_location("figure7_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(mod)
    return mod


def _run(results: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), "--out",
                           str(out), "--paper", str(PAPER)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _assert_figures(out: Path) -> None:
    for name in ("figure7.pdf", "figure7.png", "figure7-breakdown.png"):
        assert (out / name).stat().st_size > 5000, name
    assert (out / "figure7.pdf").read_bytes().startswith(b"%PDF")
    assert (out / "figure7.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_load_paper_has_every_published_value():
    mod = _load_module()
    paper = mod.load_paper(PAPER)
    assert len(paper) == 7 * 5 + 5 * 5
    assert sum(k[2] == "v100" for k in paper) == 35
    assert paper[("hydraserve", "Llama2-13B", "v100")] == pytest.approx(8.71)
    assert paper[("serverless_vllm", "OPT-2.7B", "a10")] == pytest.approx(10.14)
    assert not any(k[1].endswith("13B") and k[2] == "a10" for k in paper)
    assert {k[0] for k in paper} == set(mod.EXEC_TYPES)


def test_load_ours_reads_the_schema(tmp_path):
    mod = _load_module()
    (tmp_path / "a10.csv").write_text("\n".join([HEADER, *A10]) + "\n")
    ours = mod.load_ours(tmp_path, ["a10", "v100"])
    assert len(ours) == len(A10)
    hs = ours[("hydraserve", "Llama2-7B", "a10")]
    assert hs.ttft_s == 4.0 and hs.trials == (4.0, 4.0, 4.4)
    assert "load_s" not in hs.breakdown and hs.breakdown["fetch_s"] == 3.2
    # an empty ttft_s falls back to the mean of the two smallest trials
    assert ours[("hydraserve_with_single_worker", "Llama2-7B", "a10")].ttft_s == 6.5


def test_script_plots_and_tabulates_measurements(tmp_path):
    results, out = tmp_path / "results", tmp_path / "figs"
    results.mkdir()
    (results / "a10.csv").write_text("\n".join([HEADER, *A10]) + "\n")
    (results / "v100.csv").write_text("\n".join([HEADER, *V100]) + "\n")
    proc = _run(results, out)
    assert proc.returncode == 0, proc.stderr
    _assert_figures(out)
    rows = {tuple(line.split()[:2]): line for line in proc.stdout.splitlines()}
    a10 = rows[("a10", "Llama2-7B")]
    assert "2.50x" in a10  # serverless_vllm 10.0 / hydraserve 4.0
    assert "2.96x" in a10  # the paper: 16.57 / 5.59
    assert "2.00x" in a10  # vllm 8.0 / hydraserve 4.0
    assert "4.00x" in rows[("v100", "OPT-13B")]  # 30.0 / 7.5
    assert "no measurements" not in proc.stdout


def test_script_without_measurements_plots_the_paper(tmp_path):
    results, out = tmp_path / "empty", tmp_path / "figs"
    results.mkdir()
    proc = _run(results, out)
    assert proc.returncode == 0, proc.stderr
    assert "no measurements" in proc.stdout
    _assert_figures(out)
    assert "4.73x" in proc.stdout  # the paper's OPT-13B on V100: 40.26 / 8.52
