"""The paper's transformation of invocations into arrivals per endpoint (PAPER.md 14).

1. Functions, in order of first appearance, are cut into contiguous blocks, one block per
   endpoint: function i -> endpoint[n_endpoints * i // n_functions].
2. Per endpoint, the trace is cut into 600 s windows; in each window with more than 2 arrivals
   a Gamma distribution (location 0) is fitted to the inter-arrival times: rate = 1 / (shape *
   scale), CV = sqrt(1 / shape); a fitted rate above 5x the empirical one is replaced by the
   empirical one; the CV is multiplied by the CV factor (2, 4 or 8) and the window's arrivals
   are regenerated from a Gamma renewal process with a seed that grows per window.
3. Times are divided by 14 (two weeks -> one day), then one day is compressed into the run's
   duration (24x for the paper's one hour).
4. Thinning keeps a seeded uniform sample of the target count (no request dropped at the end).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from hydraserve.workload.azure import Invocations

WINDOW_S = 600.0
DAY = 86400.0


def map_to_endpoints(inv: Invocations, endpoints: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrival times (sorted) per endpoint; functions go to endpoints in contiguous blocks."""
    n_fn, n_ep = len(inv.functions), len(endpoints)
    block = (np.arange(n_fn, dtype=np.int64) * n_ep) // max(1, n_fn)
    owner = block[inv.function]
    return {name: inv.times[owner == e] for e, name in enumerate(endpoints)}


def fit_gamma(gaps: np.ndarray) -> tuple[float, float]:
    """(rate, CV) of a Gamma fit with location 0 to inter-arrival times. The empirical rate is
    len(gaps) / sum(gaps); it replaces a fitted rate above 5x it. Zero gaps (simultaneous
    arrivals) are raised to 1 ms so the log-likelihood stays finite; equal gaps (no spread)
    give CV 0 at the empirical rate."""
    from scipy import stats

    x = np.maximum(np.asarray(gaps, dtype=np.float64), 1e-3)
    empirical = len(x) / float(x.sum())
    if len(x) < 2 or np.allclose(x, x[0]):
        return empirical, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shape, _, scale = stats.gamma.fit(x, floc=0)
    if not (math.isfinite(shape) and math.isfinite(scale)) or shape <= 0 or scale <= 0:
        return empirical, 1.0
    rate = 1.0 / (shape * scale)
    if rate > 5 * empirical:
        rate = empirical
    return rate, math.sqrt(1.0 / shape)


def gamma_arrivals(rate: float, cv: float, start: float, end: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Arrivals of a Gamma renewal process (mean gap 1/rate, gap CV ``cv``) in [start, end)."""
    if rate <= 0 or end <= start:
        return np.empty(0)
    if cv <= 0:
        return np.arange(start + 1 / rate, end, 1 / rate)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    out, t = [], start
    expect = max(8, int((end - start) * rate * 1.5) + 8)
    while t < end:
        gaps = rng.gamma(shape, scale, expect)
        times = t + np.cumsum(gaps)
        out.append(times[times < end])
        t = float(times[-1])
    return np.concatenate(out) if out else np.empty(0)


def regenerate(times: np.ndarray, cv_factor: float, seed: int,
               window_s: float = WINDOW_S) -> np.ndarray:
    """One endpoint's arrivals regenerated window by window with its CV times ``cv_factor``;
    windows with <= 2 arrivals are dropped. Window k uses seed ``seed + k``."""
    if len(times) == 0:
        return np.empty(0)
    win = np.floor(times / window_s).astype(np.int64)
    out = []
    for k in np.unique(win):
        t = times[win == k]
        if len(t) <= 2:
            continue
        rate, cv = fit_gamma(np.diff(t))
        rng = np.random.default_rng(seed + int(k))
        out.append(gamma_arrivals(rate, cv * cv_factor, k * window_s, (k + 1) * window_s, rng))
    return np.sort(np.concatenate(out)) if out else np.empty(0)


def compress(times: np.ndarray, duration_s: float, days: float = 14.0) -> np.ndarray:
    """``days`` of trace -> one day (divide by ``days``) -> ``duration_s`` (divide by
    86400 / duration_s): the paper's 14 days -> 1 hour is a division by 336."""
    return np.asarray(times) / days / (DAY / duration_s)


def thin(n_total: int, target: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform sample of ``target`` of ``n_total`` items (all of
    them when there are fewer)."""
    if target >= n_total:
        return np.arange(n_total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=target, replace=False))
