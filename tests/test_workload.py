"""The end-to-end workload (PAPER.md 10, 11, 14): the Gamma fit and CV scaling on data with a
known CV, windows, thinning, compression, the endpoint blocks, the Azure loader, the synthetic
trace, lengths and SLOs, and whole traces with their file format and command."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import integrate, stats

from hydraserve.workload.arrivals import (compress, fit_gamma, gamma_arrivals, map_to_endpoints,
                                          regenerate, thin)
from hydraserve.workload.azure import Invocation, from_pairs, load_azure
from hydraserve.workload.make import (TraceRecord, add_make_parser, make_trace, read_trace,
                                      write_trace)
from hydraserve.workload.requests import MODELS, endpoints, sample_lengths, slo
from hydraserve.workload.synthetic import synthetic_invocations

DAY = 86400.0
# PAPER.md section 10, typed in again: (TTFT s, TPOT ms) per application for 7B / 13B
PAPER_SLOS = {("chatbot", "7B"): (7.5, 200.0), ("chatbot", "13B"): (12.0, 200.0),
              ("code", "7B"): (7.5, 84.0), ("code", "13B"): (12.0, 116.0),
              ("summarization", "7B"): (37.5, 84.0), ("summarization", "13B"): (60.0, 116.0)}


def gamma_gaps(rate: float, cv: float, n: int, seed: int = 0) -> np.ndarray:
    shape = 1 / cv ** 2
    return np.random.default_rng(seed).gamma(shape, 1 / (rate * shape), n)


def cv_of(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


@pytest.mark.parametrize("rate,cv", [(0.5, 2.0), (3.0, 0.5), (1.0, 1.0)])
def test_gamma_fit_recovers_rate_and_cv(rate, cv):
    got_rate, got_cv = fit_gamma(gamma_gaps(rate, cv, 5000))
    assert got_rate == pytest.approx(rate, rel=0.1) and got_cv == pytest.approx(cv, rel=0.1)


def test_fitted_rate_above_five_times_the_window_rate_falls_back():
    burst = np.array([0.1, 0.1, 0.2])  # 4 arrivals within 0.4 s of a 600 s window
    assert fit_gamma(burst, window_s=600)[0] == pytest.approx(4 / 600)
    assert fit_gamma(burst)[0] > 5  # without a window: gaps / their sum, no fallback
    # fitted ~1/15 s = 10x the window's 4/600: replaced; ~1/123 s = 1.2x: kept
    assert fit_gamma(np.array([10.0, 20.0, 15.0]), window_s=600)[0] == pytest.approx(4 / 600)
    kept = fit_gamma(np.array([100.0, 150.0, 120.0]), window_s=600)[0]
    assert kept == pytest.approx(3 / 370, rel=0.05)


def test_degenerate_gaps_do_not_crash():
    assert fit_gamma(np.full(10, 2.0)) == (pytest.approx(0.5), 0.0)
    rate, cv = fit_gamma(np.array([0.0, 0.0, 1.0, 0.0]))
    assert 0 < rate < 1e3 and cv > 1
    assert fit_gamma(np.zeros(5), window_s=600) == (pytest.approx(6 / 600), 0.0)
    with pytest.raises(ValueError):
        fit_gamma(np.array([]))
    with pytest.raises(ValueError):
        fit_gamma(np.array([1.0, -2.0]))


def test_gamma_arrivals_have_the_asked_rate_and_cv():
    t = gamma_arrivals(2.0, 3.0, 100.0, 100.0 + 20_000, np.random.default_rng(1))
    assert ((t >= 100) & (t < 20_100)).all() and (np.diff(t) >= 0).all()
    assert len(t) / 20_000 == pytest.approx(2.0, rel=0.1)
    assert cv_of(np.diff(t)) == pytest.approx(3.0, rel=0.15)
    periodic = gamma_arrivals(0.5, 0.0, 0.0, 10.0, np.random.default_rng(0))
    assert list(periodic) == [2.0, 4.0, 6.0, 8.0]


def test_regenerated_windows_have_the_scaled_cv_and_the_rate():
    """A Poisson endpoint (CV 1) at 1/s over 100 windows of 600 s, regenerated with CV x 4:
    gaps inside windows have a CV near 4 and the rate stays near 1/s."""
    times = np.cumsum(gamma_gaps(1.0, 1.0, 60_000, seed=3))
    out = regenerate(times, cv_factor=4, seed=11)
    win = np.floor(out / 600)
    gaps = np.concatenate([np.diff(out[win == k]) for k in np.unique(win)])
    assert cv_of(gaps) == pytest.approx(4, rel=0.25)
    assert len(out) / times[-1] == pytest.approx(1.0, rel=0.15)
    plain = regenerate(times, cv_factor=1, seed=11)
    assert cv_of(np.diff(plain)) == pytest.approx(1.0, rel=0.1)


def test_each_window_draws_from_seed_plus_its_index():
    rng = np.random.default_rng(7)
    times = np.sort(np.concatenate([rng.uniform(0, 600, 20), rng.uniform(600, 1200, 30)]))
    both = regenerate(times, 2, seed=40)
    assert np.array_equal(both, np.sort(both))
    assert np.array_equal(both, regenerate(times, 2, seed=40))
    assert not np.array_equal(both, regenerate(times, 2, seed=41))
    second = regenerate(times[20:], 2, seed=40)  # window 1 alone still uses seed 40 + 1
    assert len(second) and np.array_equal(second, both[both >= 600])
    moved = regenerate(times[20:] - 600, 2, seed=41) + 600  # the same, as window 0 of seed 41
    assert np.allclose(moved, second)


def test_windows_with_two_or_fewer_arrivals_are_dropped():
    times = np.array([10.0, 20.0, 700.0, 710.0, 720.0, 730.0])  # window 0: 2, window 1: 4
    out = regenerate(times, cv_factor=2, seed=0)
    assert len(out) and (out >= 600).all() and (out < 1200).all()
    assert len(regenerate(np.array([1.0, 2.0]), 2, 0)) == 0
    assert len(regenerate(np.array([700.0, 710.0, 720.0]), 2, 0, start=0, end=600)) == 0


def test_thinning_hits_the_target_and_is_seeded():
    items = np.arange(1000) * 0.5
    kept = thin(items, 300, seed=5)
    assert len(kept) == 300 and (np.diff(kept) > 0).all() and len(set(kept)) == 300
    assert np.array_equal(kept, thin(items, 300, seed=5))
    assert not np.array_equal(kept, thin(items, 300, seed=6))
    recs = list("abcdefghij")
    assert thin(recs, 10, 0) == recs  # the last one is kept
    assert thin(recs, 50, 0) == recs and len(thin(recs, 3, 0)) == 3


def test_compression_maps_two_weeks_into_the_run():
    span = 14 * DAY
    out = compress(np.array([0.0, span / 2, span - 1e-6]), duration_s=3600)
    assert out[0] == 0 and out[1] == pytest.approx(1800) and out[2] < 3600
    assert compress(np.array([DAY]), duration_s=3600)[0] == pytest.approx(3600 / 14)
    short = compress(np.array([0.0, span - 1]), duration_s=900)
    assert short[0] == 0 and 899 < short[1] < 900


def test_functions_go_to_endpoints_in_contiguous_blocks_keyed_by_app_and_func():
    pairs = [(("a1", "f"), 0.0), (("a2", "f"), 1.0), (("a1", "g"), 2.0), (("a1", "f"), 3.0),
             (("a3", "h"), 4.0), (("a3", "i"), 5.0)]
    inv = from_pairs(pairs)
    assert inv.functions == (("a1", "f"), ("a2", "f"), ("a1", "g"), ("a3", "h"), ("a3", "i"))
    assert list(inv) == [Invocation(k, t) for k, t in pairs]
    got = map_to_endpoints(inv, ["e0", "e1"])  # 5 functions: 0,1,2 -> e0; 3,4 -> e1
    assert list(got["e0"]) == [0.0, 1.0, 2.0, 3.0] and list(got["e1"]) == [4.0, 5.0]
    many = map_to_endpoints(inv, [f"e{i}" for i in range(10)])  # 5 functions, 10 endpoints
    assert [len(many[f"e{i}"]) for i in range(10)] == [2, 0, 1, 0, 1, 0, 1, 0, 1, 0]


def test_azure_loader(tmp_path):
    f = tmp_path / "azure.csv"
    f.write_text("app,func,end_timestamp,duration\nA,x,10.5,0.5\nB,x,3.0,1.0\nA,y,4,1\n"
                 "A,x,20,0\n")
    inv = load_azure(f)
    assert list(inv.times) == [2.0, 3.0, 10.0, 20.0]
    assert inv.functions == (("A", "x"), ("B", "x"), ("A", "y"))  # file order, (app, func)
    assert list(inv.function) == [1, 2, 0, 0]
    later = inv.between(5.0, 30.0)
    assert later.functions == (("A", "x"),) and list(later.times) == [10.0, 20.0]
    f.write_text("app,func,end_timestamp,duration\nA,x,10.5,0.5\nA,x,oops,1\n")
    with pytest.raises(ValueError, match=r"azure\.csv:3"):
        load_azure(f)
    f.write_text("app,func,end_timestamp,duration\nA,x,10.5,0.5\n\nA,x,11\n")
    with pytest.raises(ValueError, match=r"azure\.csv:4"):
        load_azure(f)
    f.write_text("app,function,end\nA,x,1\n")
    with pytest.raises(ValueError, match=r"azure\.csv:1: missing column"):
        load_azure(f)


def test_synthetic_trace_is_seeded_heavy_tailed_and_quick():
    t0 = time.perf_counter()
    inv = synthetic_invocations(seed=4)
    assert time.perf_counter() - t0 < 2.0
    assert 200_000 < len(inv) < 400_000 and 1000 < len(inv.functions) <= 2000
    assert (np.diff(inv.times) >= 0).all() and 0 <= inv.times[0] and inv.times[-1] < 14 * DAY
    counts = np.sort(np.bincount(inv.function))[::-1]
    assert counts[: len(counts) // 100].sum() > 0.15 * counts.sum()  # top 1% of functions
    assert len({func for _, func in inv.functions}) < len(inv.functions)  # names repeat
    again = synthetic_invocations(seed=4)
    assert np.array_equal(inv.times, again.times) and inv.functions == again.functions
    assert not np.array_equal(inv.times[:100], synthetic_invocations(seed=5).times[:100])
    first = np.unique(inv.function, return_index=True)[1]
    assert (np.diff(first) > 0).all()  # numbered in order of first appearance


def test_endpoints_follow_the_papers_order():
    from hydraserve.testbeds import MODEL_SETS, PAPER_MODELS

    assert MODELS == MODEL_SETS[3] and all(m in PAPER_MODELS for m in MODELS)
    eps = endpoints(per_app=2)
    assert [e.name for e in eps[:4]] == ["Llama2-13B-0", "Llama2-13B-1", "Llama2-7B-0",
                                         "Llama2-7B-1"]
    assert [e.application for e in eps] == ["chatbot"] * 4 + ["code"] * 4 + ["summarization"] * 4
    assert eps[4].name == "Llama2-13B-2" and eps[-1].name == "Llama2-7B-5"
    full = endpoints()
    assert len(full) == 384 and len({e.name for e in full}) == 384
    assert {e.index for e in full if e.application == "code"} == set(range(64, 128))
    for (app, size), want in PAPER_SLOS.items():
        assert slo(app, f"Llama2-{size}") == want


def test_lengths_per_application():
    rng = np.random.default_rng(0)
    draws = {a: np.array([sample_lengths(a, rng) for _ in range(20_000)])
             for a in ("chatbot", "code", "summarization")}
    for a, d in draws.items():
        assert d[:, 0].min() >= 1 and d[:, 0].max() <= 1024, a
        assert d[:, 1].min() >= 1 and d[:, 1].max() <= 1024, a
    chat, code, summ = draws["chatbot"], draws["code"], draws["summarization"]
    # ShareGPT means (vLLM paper), then the 1,024-token cap: E[min(X, 1024)] of the lognormal
    for column, mean in ((0, 161.31), (1, 337.99)):
        x = stats.lognorm(1.0, scale=mean * np.exp(-0.5))
        capped = integrate.quad(x.sf, 0, 1024)[0]
        assert capped < mean and chat[:, column].mean() == pytest.approx(capped, rel=0.05)
    assert code[:, 0].mean() == pytest.approx(130, rel=0.1)
    assert (summ[:, 0] == 1024).mean() > 0.9 and summ[:, 1].max() <= 512
    with pytest.raises(ValueError):
        sample_lengths("poetry", rng)


def test_make_trace_is_seeded_and_complete(tmp_path):
    meta, recs = make_trace(cv_factor=4, rate=0.1, duration_s=600, per_app=2, seed=1)
    assert len(recs) == 60 == meta["n_requests"] == round(0.1 * 600)
    assert meta["source"] == "synthetic" and meta["endpoints"] == 12 and meta["cv"] == 4
    times = [r.time for r in recs]
    assert times == sorted(times) and all(0 <= t < 600 for t in times)
    _, again = make_trace(cv_factor=4, rate=0.1, duration_s=600, per_app=2, seed=1)
    _, other = make_trace(cv_factor=4, rate=0.1, duration_s=600, per_app=2, seed=2)
    assert recs == again and recs != other
    names = {e.name: e for e in endpoints(2)}
    for r in recs:
        ep = names[r.endpoint]
        assert (r.model, r.application) == (ep.model, ep.application)
        size = "13B" if r.model == "Llama2-13B" else "7B"
        assert (r.ttft_slo_s, r.tpot_slo_ms) == PAPER_SLOS[(r.application, size)]
        assert 1 <= r.prompt_tokens <= 1024 and 1 <= r.max_tokens <= 1024
    write_trace(tmp_path / "t.jsonl", recs, meta)
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert list(json.loads(lines[0])) == ["meta"] and len(lines) == 61
    assert set(json.loads(lines[1])) == set(TraceRecord.__dataclass_fields__)
    meta2, back = read_trace(tmp_path / "t.jsonl")
    assert back == recs and meta2 == meta


def test_output_cap_and_paper_defaults():
    meta, recs = make_trace(max_output_tokens=16)
    assert len(recs) == 2160 and meta["duration_s"] == 3600 and meta["endpoints"] == 384
    assert max(r.max_tokens for r in recs) <= 16 and meta["max_output_tokens"] == 16
    assert {r.application for r in recs} == {"chatbot", "code", "summarization"}
    assert all(0 <= r.time < 3600 for r in recs)


def test_read_trace_errors(tmp_path):
    good = json.dumps({"time": 1.0, "endpoint": "e", "model": "Llama2-7B",
                       "application": "code", "prompt_tokens": 3, "max_tokens": 4,
                       "ttft_slo_s": 7.5, "tpot_slo_ms": 84.0})
    cases = {"bad1.jsonl": ('{"meta": {"version": 1}}\n{"time": 1}\n', ":2:"),
             "bad2.jsonl": (good + "\n", ":1:"),
             "bad3.jsonl": ('{"meta": {"version": 1}}\n' + good + "\n" +
                            good.replace('"time": 1.0', '"time": 0.5') + "\n", ":3:"),
             "bad4.jsonl": ('{"meta": {"version": 2}}\n', ":1:"),
             "bad5.jsonl": ('{"meta": {"version": 1}}\n' +
                            good.replace('"max_tokens": 4', '"max_tokens": "4"') + "\n", ":2:"),
             "bad6.jsonl": ("", ": empty")}
    for name, (text, where) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + where):
            read_trace(tmp_path / name)


def test_make_trace_from_an_azure_file(tmp_path):
    inv = synthetic_invocations(seed=2, functions=30, mean_total=20_000)
    rng = np.random.default_rng(0)
    path = tmp_path / "azure.csv"
    with open(path, "w") as f:
        f.write("app,func,end_timestamp,duration\n")
        for (app, func), t in inv:
            d = float(rng.exponential(0.5))
            f.write(f"{app},{func},{t + d!r},{d!r}\n")
    meta, recs = make_trace(cv_factor=2, rate=0.05, duration_s=1200, per_app=1, azure=str(path))
    assert meta["source"] == "azure" and len(recs) == 60
    assert {r.endpoint for r in recs} <= {e.name for e in endpoints(1)}


def test_make_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_make_parser(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "trace.jsonl"
    args = parser.parse_args(["make", "--out", str(out), "--cv", "2", "--rate", "0.05",
                              "--duration", "600", "--per-app", "2", "--seed", "3",
                              "--max-output-tokens", "8"])
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("wrote 30 requests") and str(out) in line and "chatbot" in line
    meta, recs = read_trace(out)
    assert meta["cv"] == 2 and meta["seed"] == 3 and len(recs) == 30
    assert max(r.max_tokens for r in recs) <= 8
    defaults = parser.parse_args(["make", "--out", "x"])
    assert (defaults.cv, defaults.rate, defaults.duration, defaults.per_app, defaults.seed,
            defaults.azure, defaults.max_output_tokens) == (8, 0.6, 3600, 64, 0, None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["make", "--out", "x", "--cv", "3"])


def test_workload_modules_do_not_import_torch():
    code = ("import sys, hydraserve.workload.make, hydraserve.workload.synthetic; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_synthetic_trace_has_the_paper_application_mix():
    """The synthetic trace is thinned to the mix derived from Figures 9 and 11 (README, The
    workload); within a couple of points for small traces, and per seed."""
    from collections import Counter

    from hydraserve.workload.arrivals import quotas, thin_by_group
    from hydraserve.workload.make import APP_SHARES

    assert sum(APP_SHARES.values()) == pytest.approx(1.0)
    assert APP_SHARES == pytest.approx({"chatbot": 0.549, "code": 0.348,
                                        "summarization": 0.103})
    for seed, per_app, rate, dur in ((0, 8, 0.6, 600), (3, 4, 0.3, 600)):
        meta, recs = make_trace(cv_factor=8, rate=rate, duration_s=dur, per_app=per_app,
                                seed=seed)
        n = Counter(r.application for r in recs)
        assert len(recs) == round(rate * dur)
        for app, share in APP_SHARES.items():
            assert abs(n[app] / len(recs) - share) <= 0.02, (seed, app, n)
        assert meta["app_shares"] == APP_SHARES
    assert quotas([0.549, 0.348, 0.103], 2160) == [1186, 752, 222]
    # a group short of its quota gives all it has; the rest go to the others, in time order
    items, groups = np.arange(20), np.array([0] * 15 + [1] * 3 + [2] * 2)
    kept = thin_by_group(items, groups, [0.2, 0.6, 0.2], 10, seed=1)
    assert len(kept) == 10 and list(kept) == sorted(kept)
    assert set(kept) >= {15, 16, 17}
    assert np.array_equal(kept, thin_by_group(items, groups, [0.2, 0.6, 0.2], 10, seed=1))
