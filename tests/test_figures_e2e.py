"""ae_scripts/figure9.py, figure11.py, figure13.py: our run summaries are plotted beside the
paper's values, "real" runs win over "sim" ones, settings not run fall back to the paper's value,
and Figure 13's per-endpoint ratios are computed right."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "ae_scripts"
PAPER = ROOT / "results" / "paper"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("end2end_results", SCRIPTS / "end2end_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(mod)
    return mod


def _endpoint(tpot: float | None, cost: float | None, app: str = "chatbot") -> dict[str, Any]:
    return {"requests": 5, "application": app, "model": "Llama2-7B", "tpot_ms_mean": tpot,
            "cost_gbs_per_request": cost, "ttft_attainment": 80.0}


def _summary(root: Path, exec_type: str, cv: float, rate: float, source: str, total: float, *,
             apps: dict[str, float] | None = None, tpot: float | None = None,
             endpoints: dict[str, dict[str, Any]] | None = None, folder: str | None = None,
             mtime: float | None = None) -> Path:
    """Write one run's summary.json the way the end-to-end runner lays it out."""
    d = root / (folder or f"{exec_type}-cv{cv:g}-rate{rate:g}")
    d.mkdir(parents=True, exist_ok=True)
    ttft = {"total": total, **(apps or {})}
    s = {"exec_type": exec_type, "cv": cv, "rate": rate, "source": source,
         "setting": {"note": "test"}, "requests": 100, "ttft_attainment": ttft,
         "tpot_attainment": None if tpot is None else {"total": tpot},
         "cost_gbs_per_request": 1.0, "per_endpoint": endpoints or {}}
    path = d / "summary.json"
    path.write_text(json.dumps(s))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _run(script: str, results: Path, out: Path, *extra: str) -> tuple[dict[str, Any], str]:
    """Run a figure script with --json; return the parsed last stdout line and all stdout."""
    p = subprocess.run([sys.executable, str(SCRIPTS / script), "--results", str(results),
                        "--out", str(out), "--json", *extra],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stdout


def _assert_written(out: Path, *stems: str) -> None:
    for stem in stems:
        assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF"), stem
        assert (out / f"{stem}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), stem
        assert (out / f"{stem}.png").stat().st_size > 5000, stem


def _row9(rows: list[dict], et: str, cv: float, rate: float) -> dict:
    found = [r for r in rows if (r["exec_type"], r["cv"], r["rate"]) == (et, cv, rate)]
    assert len(found) == 1, (et, cv, rate, found)
    return found[0]


def test_paper_csvs_hold_the_published_values() -> None:
    mod = _module()
    f9 = mod.load_paper_fig9(PAPER)
    assert len(f9) == 36
    assert f9[mod.key("serverless_vllm", 2, 0.6)] == pytest.approx(46.7)
    assert f9[mod.key("hydraserve_with_cache", 8, 0.8)] == pytest.approx(78.5)
    assert f9[mod.key("serverlessllm", 4, 0.7)] == pytest.approx(57.7)
    assert {k[0] for k in f9} == set(mod.EXEC_TYPES)
    f11 = mod.load_paper_fig11(PAPER)
    assert len(f11) == 12
    assert f11[("hydraserve", "code")] == pytest.approx(76.6)
    assert f11[("serverlessllm", "summarization")] == pytest.approx(99.6)
    f13 = mod.load_paper_fig13(PAPER)
    assert f13["tpot_ratio"] == {"mean": 1.08, "median": 1.05, "frac_below_1": None}
    assert f13["cost_ratio"] == {"mean": 0.82, "median": 0.79, "frac_below_1": 0.88}
    for name in ("figure9.csv", "figure11.csv", "figure13.csv"):
        assert "NSDI'26" in (PAPER / name).read_text().splitlines()[1]


def test_load_runs_prefers_real_then_newest(tmp_path: Path) -> None:
    mod = _module()
    _summary(tmp_path, "hydraserve", 8, 0.6, "real", 70.0, mtime=1_000)
    _summary(tmp_path, "hydraserve", 8.0, 0.6, "sim", 60.0, folder="sim/hs", mtime=2_000)
    _summary(tmp_path, "serverlessllm", 2, 0.7, "sim", 40.0, folder="a", mtime=1_000)
    _summary(tmp_path, "serverlessllm", 2, 0.7, "sim", 45.0, folder="b", mtime=3_000)
    runs = mod.load_runs(tmp_path)
    assert set(runs) == {mod.key("hydraserve", 8, 0.6), mod.key("serverlessllm", 2, 0.7)}
    assert runs[mod.key("hydraserve", 8, 0.6)].ttft() == 70.0  # real beats the newer sim
    assert runs[mod.key("serverlessllm", 2, 0.7)].ttft() == 45.0  # same source: newest
    assert mod.load_runs(tmp_path / "absent") == {}


def test_figure9_ours_beside_paper_with_fallback(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "figs"
    _summary(results, "hydraserve", 8, 0.6, "real", 79.0, tpot=91.0, mtime=1_000)
    _summary(results, "hydraserve", 8, 0.6, "sim", 60.0, folder="sim/hydraserve-cv8-rate0.6",
             mtime=2_000)
    _summary(results, "serverless_vllm", 2, 0.7, "sim", 41.0)
    _summary(results, "hydraserve", 8, 0.3, "sim", 95.0)  # a rate the paper did not run
    _summary(results, "vllm", 8, 0.6, "real", 10.0)  # not one of Figure 9's four types
    data, stdout = _run("figure9.py", results, out)
    rows = data["rows"]
    assert len(rows) == 36 + 1
    hs = _row9(rows, "hydraserve", 8, 0.6)
    assert (hs["ttft_attainment"], hs["source"], hs["tpot_attainment"]) == (79.0, "real", 91.0)
    assert hs["paper_ttft_attainment"] == pytest.approx(82.5)
    sv = _row9(rows, "serverless_vllm", 2, 0.7)
    assert (sv["ttft_attainment"], sv["source"], sv["tpot_attainment"]) == (41.0, "sim", None)
    fallback = _row9(rows, "serverlessllm", 4, 0.8)
    assert fallback["source"] == "paper"
    assert fallback["ttft_attainment"] == pytest.approx(47.7)
    assert fallback["tpot_attainment"] is None
    extra = _row9(rows, "hydraserve", 8, 0.3)
    assert extra["source"] == "sim" and extra["paper_ttft_attainment"] is None
    assert sum(r["source"] == "paper" for r in rows) == 34
    assert not any(r["exec_type"] == "vllm" for r in rows)
    assert "79.0" in stdout and "82.5" in stdout
    _assert_written(out, "figure9")


def test_figure9_without_runs_draws_the_paper(tmp_path: Path) -> None:
    data, _ = _run("figure9.py", tmp_path / "none", tmp_path / "figs")
    paper = _module().load_paper_fig9(PAPER)
    assert len(data["rows"]) == 36
    assert all(r["source"] == "paper" for r in data["rows"])
    assert {(r["exec_type"], r["cv"], r["rate"]): r["ttft_attainment"]
            for r in data["rows"]} == paper
    _assert_written(tmp_path / "figs", "figure9")


def test_figure11_per_application(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "figs"
    _summary(results, "hydraserve", 8, 0.6, "real", 80.0,
             apps={"chatbot": 81.0, "code": 70.0})  # no summarization value
    _summary(results, "serverlessllm", 8, 0.6, "real", 55.0,
             apps={"chatbot": 50.0, "code": 40.0, "summarization": 98.0}, mtime=1_000)
    _summary(results, "serverlessllm", 8, 0.6, "sim", 1.0, folder="sim",
             apps={"chatbot": 1.0, "code": 1.0, "summarization": 1.0}, mtime=2_000)
    _summary(results, "serverless_vllm", 8, 0.7, "real", 1.0,
             apps={"chatbot": 1.0, "code": 1.0, "summarization": 1.0})  # another rate
    data, stdout = _run("figure11.py", results, out)
    rows = {(r["exec_type"], r["application"]): r for r in data["rows"]}
    assert len(data["rows"]) == 12 and len(rows) == 12
    assert rows[("hydraserve", "chatbot")]["ttft_attainment"] == 81.0
    assert rows[("hydraserve", "chatbot")]["source"] == "real"
    assert rows[("hydraserve", "chatbot")]["paper_ttft_attainment"] == pytest.approx(83.5)
    assert rows[("hydraserve", "summarization")]["source"] == "paper"
    assert rows[("hydraserve", "summarization")]["ttft_attainment"] == pytest.approx(97.3)
    assert rows[("serverlessllm", "code")]["ttft_attainment"] == 40.0  # real over sim
    assert rows[("serverlessllm", "code")]["source"] == "real"
    assert rows[("serverless_vllm", "code")]["source"] == "paper"
    assert rows[("serverless_vllm", "code")]["ttft_attainment"] == pytest.approx(45.0)
    assert "81.0" in stdout
    _assert_written(out, "figure11")


def test_figure13_ratios_on_a_hand_made_case(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "figs"
    _summary(results, "hydraserve", 8, 0.6, "real", 80.0, endpoints={
        "e1": _endpoint(10.0, 50.0), "e2": _endpoint(30.0, 300.0),
        "e3": _endpoint(10.0, 10.0),  # not in the baseline run
        "e4": _endpoint(None, 80.0)})  # TPOT not measured
    _summary(results, "serverless_vllm", 8, 0.6, "sim", 50.0, endpoints={
        "e1": _endpoint(20.0, 100.0), "e2": _endpoint(20.0, 200.0),
        "e4": _endpoint(10.0, 100.0), "e5": _endpoint(10.0, 100.0)})
    data, stdout = _run("figure13.py", results, out)
    a, b = data["a"], data["b"]
    assert a["ratios"] == pytest.approx({"e1": 0.5, "e2": 1.5})
    assert (a["n"], a["mean"], a["median"], a["frac_below_1"]) == (2, 1.0, 1.0, 0.5)
    assert a["source"] == "sim"  # one of the two runs is simulated
    assert a["paper"]["mean"] == pytest.approx(1.08)
    assert b["ratios"] == pytest.approx({"e1": 0.5, "e2": 1.5, "e4": 0.8})
    assert b["n"] == 3
    assert b["mean"] == pytest.approx(2.8 / 3)
    assert b["median"] == pytest.approx(0.8)
    assert b["frac_below_1"] == pytest.approx(2 / 3)
    assert b["paper"]["frac_below_1"] == pytest.approx(0.88)
    assert "0.933" in stdout and "0.82" in stdout
    _assert_written(out, "figure13-a", "figure13-b")


def test_figure13_missing_run_draws_the_paper_only(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "figs"
    _summary(results, "hydraserve", 8, 0.6, "real", 80.0, endpoints={"e1": _endpoint(1.0, 1.0)})
    data, stdout = _run("figure13.py", results, out)
    for name, mean, median in (("a", 1.08, 1.05), ("b", 0.82, 0.79)):
        panel = data[name]
        assert panel["source"] == "paper" and panel["n"] == 0 and panel["ratios"] == {}
        assert (panel["mean"], panel["median"]) == pytest.approx((mean, median))
        assert "serverless_vllm" in panel["note"]
    assert data["b"]["frac_below_1"] == pytest.approx(0.88)
    assert "paper's summary statistics only" in stdout
    _assert_written(out, "figure13-a", "figure13-b")


@pytest.mark.parametrize("script", ["figure9.py", "figure11.py", "figure13.py"])
def test_help_explains_the_options(script: str) -> None:
    p = subprocess.run([sys.executable, str(SCRIPTS / script), "--help"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0
    for option in ("--results", "--paper", "--out", "--json"):
        assert option in p.stdout


@pytest.mark.slow
def test_several_seeds_aggregate_and_error_bars(tmp_path: Path) -> None:
    """run_end2end_expr.py --sim --seeds 2 on tiny traces: seed 0 keeps the setting's folder,
    every seed a short summary, sim-aggregate.json the mean and spread; the figures draw the
    mean with min-max bars, and ignore the aggregate once it disagrees with the summary."""
    results, out = tmp_path / "results", tmp_path / "figs"
    p = subprocess.run([sys.executable, str(SCRIPTS / "run_end2end_expr.py"), "--sim",
                        "--seeds", "2", "--per-app", "1", "--duration", "200", "--rate", "0.1",
                        "--exec-types", "serverless_vllm,hydraserve", "--out", str(results),
                        "--no-figure"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    mod = _module()
    for et in ("serverless_vllm", "hydraserve"):
        folder = results / f"{et}-cv8-rate0.1-sim"
        assert json.loads((folder / "summary.json").read_text())["setting"]["trace"]["seed"] == 0
        assert sorted(f.name for f in (folder / "seeds").iterdir()) == ["seed0.json",
                                                                         "seed1.json"]
    agg = json.loads((results / "sim-aggregate.json").read_text())
    entries = {e["exec_type"]: e for e in agg["entries"]}
    assert set(entries) == {"serverless_vllm", "hydraserve"} and "min and max" in agg["what"]
    hs = entries["hydraserve"]
    assert hs["seeds"] == [0, 1] and (hs["cv"], hs["rate"]) == (8.0, 0.1)
    assert set(hs["ttft_attainment"]) == {"total", "chatbot", "code", "summarization"}
    for part in hs["ttft_attainment"].values():
        assert set(part) == {"mean", "min", "max", "std", "values"} and len(part["values"]) == 2
        assert part["min"] <= part["mean"] <= part["max"]
        assert part["mean"] == pytest.approx(sum(part["values"]) / 2)
    seed0 = json.loads((results / "hydraserve-cv8-rate0.1-sim" / "summary.json").read_text())
    assert hs["ttft_attainment"]["total"]["values"][0] == seed0["ttft_attainment"]["total"]
    assert set(hs["figure13"]) == {"tpot_ratio", "cost_ratio"}
    assert "figure13" not in entries["serverless_vllm"]
    assert mod.build_aggregate(results) == agg  # the file is the aggregate of the seed files

    data, stdout = _run("figure9.py", results, out)
    row = _row9(data["rows"], "hydraserve", 8, 0.1)
    t = hs["ttft_attainment"]["total"]
    assert (row["seeds"], row["ttft_attainment"], row["ttft_min"], row["ttft_max"]) == \
        (2, t["mean"], t["min"], t["max"])
    assert "2 seeds" in stdout
    data, _ = _run("figure11.py", results, out, "--cv", "8", "--rate", "0.1")
    code = {(r["exec_type"], r["application"]): r for r in data["rows"]}[("hydraserve", "code")]
    assert code["seeds"] == 2 and code["ttft_attainment"] == hs["ttft_attainment"]["code"]["mean"]
    data, _ = _run("figure13.py", results, out, "--cv", "8", "--rate", "0.1")
    for name, metric in (("a", "tpot_ratio"), ("b", "cost_ratio")):
        if data[name]["source"] == "sim":
            assert data[name]["seeds"]["n"] == 2
            assert data[name]["seeds"]["mean"]["values"][0] == pytest.approx(data[name]["mean"])
            assert data[name]["seeds"]["mean"] == hs["figure13"][metric]["mean"]
    _assert_written(out, "figure9", "figure11", "figure13-a", "figure13-b")

    # a summary rewritten without the seed files (a stale aggregate): the summary alone
    path = results / "hydraserve-cv8-rate0.1-sim" / "summary.json"
    seed0["ttft_attainment"]["total"] = -1.0 if t["values"][0] != -1.0 else -2.0
    path.write_text(json.dumps(seed0))
    data, _ = _run("figure9.py", results, out)
    row = _row9(data["rows"], "hydraserve", 8, 0.1)
    assert row["seeds"] == 1 and row["ttft_min"] is None
    assert row["ttft_attainment"] == seed0["ttft_attainment"]["total"]


def test_real_runs_are_labelled_with_size_and_scale(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "figs"
    path = _summary(results, "hydraserve", 8, 0.05, "real", 90.0)
    s = json.loads(path.read_text())
    s["setting"] = {"testbed": "hybrid (1/100 scale, local cluster)", "endpoints": 24,
                    "duration_s": 600.0}
    path.write_text(json.dumps(s))
    data, stdout = _run("figure9.py", results, out)
    row = _row9(data["rows"], "hydraserve", 8, 0.05)
    assert row["scale"] == "CPU run: 24 endpoints, 1/100 scale, 600 s"
    assert "24 endpoints, 1/100 scale" in stdout
    assert _module().DEFAULT_RESULTS.name == "end2end"
