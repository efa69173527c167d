"""The end-to-end workload: the Gamma fit and CV scaling on data with a known CV, windows,
thinning, compression, the endpoint blocks, the Azure loader and whole traces."""
from __future__ import annotations

import numpy as np
import pytest

from hydraserve.workload.arrivals import (compress, fit_gamma, gamma_arrivals, map_to_endpoints,
                                          regenerate, thin)
from hydraserve.workload.azure import from_pairs, load_azure
from hydraserve.workload.make import make_trace, read_trace, write_trace
from hydraserve.workload.requests import SLOS, Application, endpoints, slo


def gamma_gaps(rate, cv, n, seed=0):
    shape = 1 / cv ** 2
    return np.random.default_rng(seed).gamma(shape, 1 / (rate * shape), n)


@pytest.mark.parametrize("rate,cv", [(0.5, 2.0), (3.0, 0.5), (1.0, 1.0)])
def test_gamma_fit_recovers_rate_and_cv(rate, cv):
    got_rate, got_cv = fit_gamma(gamma_gaps(rate, cv, 5000))
    assert got_rate == pytest.approx(rate, rel=0.1) and got_cv == pytest.approx(cv, rel=0.1)


def test_degenerate_gaps_do_not_crash():
    assert fit_gamma(np.full(10, 2.0)) == (pytest.approx(0.5), 0.0)
    rate, cv = fit_gamma(np.array([0.0, 0.0, 1.0, 0.0]))
    assert rate > 0 and cv >= 0


def test_regenerated_windows_have_the_scaled_cv():
    """A Poisson endpoint (CV 1) at 1/s; every 600 s window regenerated with CV x 4: the gaps
    inside windows have a CV near 4 and the rate stays near 1/s."""
    times = np.cumsum(gamma_gaps(1.0, 1.0, 60_000, seed=3))
    out = regenerate(times, cv_factor=4, seed=11)
    win = np.floor(out / 600)
    gaps = np.concatenate([np.diff(out[win == k]) for k in np.unique(win)])
    assert gaps.std() / gaps.mean() == pytest.approx(4, rel=0.25)
    assert len(out) / (times[-1]) == pytest.approx(1.0, rel=0.3)
    assert np.array_equal(out, regenerate(times, 4, seed=11))
    assert not np.array_equal(out, regenerate(times, 4, seed=12))


def test_windows_with_two_or_fewer_arrivals_are_dropped():
    times = np.array([10.0, 20.0, 700.0, 710.0, 720.0, 730.0])  # window 0: 2, window 1: 4
    out = regenerate(times, cv_factor=2, seed=0)
    assert len(out) and (out >= 600).all() and (out < 1200).all()
    assert len(regenerate(np.array([1.0, 2.0]), 2, 0)) == 0


def test_gamma_arrivals_stay_in_their_window():
    t = gamma_arrivals(2.0, 8.0, 600, 1200, np.random.default_rng(0))
    assert ((t >= 600) & (t < 1200)).all() and (np.diff(t) >= 0).all()


def test_thinning_hits_the_target_and_is_seeded():
    idx = thin(1000, 300, seed=5)
    assert len(idx) == 300 and (np.diff(idx) > 0).all()
    assert np.array_equal(idx, thin(1000, 300, seed=5))
    assert not np.array_equal(idx, thin(1000, 300, seed=6))
    assert np.array_equal(thin(10, 10, 0), np.arange(10))  # the last one is kept
    assert np.array_equal(thin(10, 50, 0), np.arange(10))


def test_compression_maps_two_weeks_into_the_run():
    span = 14 * 86400.0
    out = compress(np.array([0.0, span / 2, span - 1e-6]), duration_s=3600)
    assert out[0] == 0 and out[1] == pytest.approx(1800) and out[2] < 3600
    assert compress(np.array([span - 1]), duration_s=900)[0] < 900


def test_functions_go_to_endpoints_in_contiguous_blocks_keyed_by_app_and_func():
    keys = [("a1", "f"), ("a2", "f"), ("a1", "g"), ("a1", "f"), ("a3", "h"), ("a3", "i")]
    inv = from_pairs(keys, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert inv.functions == (("a1", "f"), ("a2", "f"), ("a1", "g"), ("a3", "h"), ("a3", "i"))
    got = map_to_endpoints(inv, ["e0", "e1"])  # 5 functions: 0,1,2 -> e0; 3,4 -> e1
    assert list(got["e0"]) == [0.0, 1.0, 2.0, 3.0] and list(got["e1"]) == [4.0, 5.0]


def test_azure_loader(tmp_path):
    f = tmp_path / "azure.csv"
    f.write_text("app,func,end_timestamp,duration\nA,x,10.5,0.5\nB,x,3.0,1.0\nA,y,4,1\n")
    inv = load_azure(f)
    assert list(inv.times) == [2.0, 3.0, 10.0]
    assert inv.functions == (("B", "x"), ("A", "y"), ("A", "x"))
    f.write_text("app,func,end_timestamp,duration\nA,x,10.5,0.5\nA,x,oops,1\n")
    with pytest.raises(ValueError, match="azure.csv:3"):
        load_azure(f)
    f.write_text("app,function,end\nA,x,1\n")
    with pytest.raises(ValueError, match="missing column"):
        load_azure(f)


def test_endpoints_follow_the_papers_order():
    eps = endpoints(per_app=2)
    assert [e.name for e in eps[:4]] == ["Llama2-13B-0", "Llama2-13B-1", "Llama2-7B-0",
                                         "Llama2-7B-1"]
    assert [e.application for e in eps] == ["chatbot"] * 4 + ["code"] * 4 + ["summarization"] * 4
    assert eps[4].name == "Llama2-13B-2" and len(endpoints()) == 384
    assert slo("code", "Llama2-13B") == (12.0, 116.0) and slo("summarization", "Llama2-7B") == \
        (37.5, 84.0)
    assert SLOS[Application.CHATBOT]["7B"] == (7.5, 200.0)


def test_make_trace_is_seeded_and_complete(tmp_path):
    meta, recs = make_trace(cv_factor=4, rate=0.1, duration_s=600, per_app=4, seed=1)
    assert len(recs) == 60 == meta["requests"]
    assert [r.time for r in recs] == sorted(r.time for r in recs)
    assert all(0 <= r.time < 600 for r in recs)
    _, again = make_trace(cv_factor=4, rate=0.1, duration_s=600, per_app=4, seed=1)
    _, other = make_trace(cv_factor=4, rate=0.1, duration_s=600, per_app=4, seed=2)
    assert recs == again and recs != other
    for r in recs:
        assert (r.ttft_slo_s, r.tpot_slo_ms) == slo(r.application, r.model)
        assert 1 <= r.prompt_tokens <= 1024 and 1 <= r.max_tokens <= 1024
    assert {r.application for r in recs} == {"chatbot", "code", "summarization"}
    write_trace(tmp_path / "t.jsonl", recs, meta)
    meta2, back = read_trace(tmp_path / "t.jsonl")
    assert back == recs and meta2["cv"] == 4
    _, capped = make_trace(cv_factor=4, rate=0.1, duration_s=600, per_app=4, seed=1,
                           max_output_tokens=16)
    assert max(r.max_tokens for r in capped) <= 16
    (tmp_path / "bad.jsonl").write_text('{"meta": {}}\n{"time": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_trace(tmp_path / "bad.jsonl")
