"""The committed simulated end-to-end results cannot go stale: one short setting (CV 8, 0.6
req/s, a 300 s trace, seed 0, every execution type) is simulated again and must equal the
committed expectation exactly (the simulator is deterministic), and the committed results must
be the ones the expectation's regeneration wrote. When either fails, the code changed since
the last regeneration: run `python scripts/regenerate_sim_results.py` (README, "Reproducing
the paper") and commit results/end2end/."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "end2end"
HOW = ("the simulated results are stale: run `python scripts/regenerate_sim_results.py` "
       "and commit results/end2end/")


def _regen():
    spec = importlib.util.spec_from_file_location("regenerate_sim_results",
                                                  ROOT / "scripts" / "regenerate_sim_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _expectation() -> dict:
    path = RESULTS / _regen().EXPECTATION
    assert path.is_file(), f"no {path}: {HOW}"
    return json.loads(path.read_text())


@pytest.mark.slow
def test_short_setting_simulates_to_the_committed_expectation(tmp_path):
    regen = _regen()
    expected = _expectation()
    assert expected["setting"] == regen.CHECK, HOW
    got = regen.short_check(tmp_path)
    assert set(got) == set(expected["summaries"]), HOW
    for et, summary in got.items():
        want = expected["summaries"][et]
        for k in ("ttft_attainment", "tpot_attainment", "cost_gbs_per_request", "instances",
                  "requests", "answered", "ttft_s"):  # the headline first, for a short message
            assert summary.get(k) == want.get(k), f"{et} {k}: {summary.get(k)} != " \
                                                  f"{want.get(k)}; {HOW}"
        assert summary == want, f"{et}: {HOW}"


def test_committed_results_come_from_the_last_regeneration():
    expected = _expectation()
    if not expected.get("committed"):
        pytest.skip("the expectation file was made without the full regeneration "
                    "(--expectation-only): the committed simulated results are not checked "
                    f"until `python scripts/regenerate_sim_results.py` runs in full")
    got = _regen().fingerprints(RESULTS)
    missing = sorted(set(expected["committed"]) - set(got))
    extra = sorted(set(got) - set(expected["committed"]))
    changed = sorted(p for p in set(got) & set(expected["committed"])
                     if got[p] != expected["committed"][p])
    assert not (missing or extra or changed), (f"missing {missing[:5]}, not from the last "
                                               f"regeneration {extra[:5]}, changed "
                                               f"{changed[:5]}: {HOW}")
