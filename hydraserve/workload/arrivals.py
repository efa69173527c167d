"""The paper's transformation of function invocations into arrivals per endpoint (PAPER.md 14).

1. Functions, in order of first appearance, are cut into contiguous blocks, one block per
   endpoint: function i -> endpoints[n_endpoints * i // n_functions].
2. Per endpoint, the trace is cut into 600 s windows; a window with <= 2 arrivals is dropped;
   in the others a Gamma distribution (location 0) is fitted to the inter-arrival times:
   rate = 1 / (shape * scale), CV = sqrt(1 / shape); a fitted rate above 5x the empirical one
   is replaced by the empirical one; the CV is multiplied by the CV factor (2, 4 or 8) and the
   window's arrivals are regenerated from a Gamma renewal process started at the window's
   start, window k with seed ``seed + k``.
3. Times are divided by 14 (two weeks -> one day), then one day is compressed into the run's
   duration (24x for the paper's one hour).
4. Thinning keeps a seeded uniform sample of exactly the target count, in time order (the
   artifact's thinning was unseeded and dropped the last request; we do neither).

The empirical rate of a window (the 5x rule) is its number of arrivals divided by the window's
length, as in the artifact's code (AlpaServe's trace replay, which the artifact descends from);
without a window (``fit_gamma`` alone) it is the number of gaps divided by their sum.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TypeVar

import numpy as np


from hydraserve.workload.azure import Invocations

WINDOW_S = 600.0
DAY = 86400.0
GAP_FLOOR_S = 1e-6  # added to every gap: simultaneous arrivals would make the fit diverge
T = TypeVar("T")


def map_to_endpoints(inv: Invocations, endpoints: Sequence[str]) -> dict[str, np.ndarray]:
    """Sorted arrival times per endpoint; function i (in order of first appearance) goes to
    ``endpoints[len(endpoints) * i // n_functions]``. With fewer functions than endpoints some
    endpoints get no arrivals (the artifact required at least as many functions)."""
    n_fn, n_ep = len(inv.functions), len(endpoints)
    owner = (np.arange(n_fn, dtype=np.int64) * n_ep // max(1, n_fn))[inv.function]
    return {name: inv.times[owner == e] for e, name in enumerate(endpoints)}


def fit_gamma(gaps: np.ndarray, window_s: float | None = None) -> tuple[float, float]:
    """(rate, CV) of a Gamma fit with location 0 (``scipy.stats.gamma.fit(x, floc=0)``) to
    inter-arrival times x = gaps + 1 us (zero gaps, from simultaneous arrivals, would make the
    log-likelihood infinite; the artifact added 1 us as well).

    The empirical rate is (len(gaps) + 1) / window_s (arrivals per second of the window) when
    ``window_s`` is given, else len(gaps) / sum(x); a fitted rate above 5x it is replaced by it.
    Degenerate input: equal gaps (no spread, so no finite shape) give CV 0 at rate 1 / gap,
    subject to the same 5x rule; a failed fit gives (nan, nan) -- the caller drops the window,
    as the artifact did. Fewer than one gap is a ValueError."""
    g = np.asarray(gaps, dtype=np.float64)
    if g.ndim != 1 or len(g) < 1 or not np.isfinite(g).all() or (g < 0).any():
        raise ValueError(f"need one or more finite non-negative gaps, got {gaps!r}")
    x = g + GAP_FLOOR_S
    empirical = (len(x) + 1) / window_s if window_s else len(x) / float(x.sum())
    if float(x.max() - x.min()) <= 1e-9 * float(x.mean()):
        rate = 1.0 / float(x.mean())
        return (empirical if rate > 5 * empirical else rate), 0.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            from scipy import stats  # here: importing it costs every command ~1.4 s

            shape, _, scale = stats.gamma.fit(x, floc=0)
    except (ValueError, RuntimeError, FloatingPointError):
        return math.nan, math.nan
    if not (math.isfinite(shape) and math.isfinite(scale)) or shape <= 0 or scale <= 0:
        return math.nan, math.nan
    rate = 1.0 / (shape * scale)
    return (empirical if rate > 5 * empirical else rate), math.sqrt(1.0 / shape)


def gamma_arrivals(rate: float, cv: float, start: float, end: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Arrivals in [start, end) of a Gamma renewal process with mean gap 1/rate and gap CV
    ``cv`` (shape 1/cv^2, scale 1/(rate*shape)), the first arrival one gap after ``start``;
    CV 0 is the periodic process."""
    if not rate > 0 or end <= start:
        return np.empty(0)
    if cv <= 0:
        return np.arange(start + 1.0 / rate, end, 1.0 / rate)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    batch = int((end - start) * rate * 1.2) + 16
    out, t = [], start
    while t < end:
        arr = t + np.cumsum(rng.gamma(shape, scale, batch))
        out.append(arr[arr < end])
        t = float(arr[-1])
    return np.concatenate(out)


def regenerate(times: np.ndarray, cv_factor: float, seed: int, window_s: float = WINDOW_S,
               start: float = 0.0, end: float | None = None) -> np.ndarray:
    """One endpoint's arrivals regenerated window by window with the fitted CV times
    ``cv_factor``. Windows are [start + k*window_s, start + (k+1)*window_s), the last one cut
    at ``end`` (default: the window holding the last arrival); arrivals outside [start, end)
    are ignored; windows with <= 2 arrivals are dropped. Window k draws from
    ``np.random.default_rng(seed + k)`` (seed >= 0). Returns sorted times."""
    t = np.sort(np.asarray(times, dtype=np.float64))
    t = t[t >= start] if end is None else t[(t >= start) & (t < end)]
    if len(t) == 0:
        return np.empty(0)
    win = np.floor((t - start) / window_s).astype(np.int64)
    ks, first, counts = np.unique(win, return_index=True, return_counts=True)
    out = []
    for k, i, n in zip(ks.tolist(), first.tolist(), counts.tolist()):
        if n <= 2:
            continue
        w0 = start + k * window_s
        w1 = w0 + window_s if end is None else min(w0 + window_s, end)
        rate, cv = fit_gamma(np.diff(t[i:i + n]), w1 - w0)
        if math.isnan(rate):
            continue
        out.append(gamma_arrivals(rate, cv * cv_factor, w0, w1,
                                  np.random.default_rng(seed + k)))
    return np.concatenate(out) if out else np.empty(0)


def compress(times: np.ndarray, duration_s: float, days: float = 14.0) -> np.ndarray:
    """``days`` of trace -> one day (divide by ``days``) -> ``duration_s`` (divide by
    86400 / duration_s): [0, days) maps onto [0, duration_s); the paper's 14 days -> 1 hour is
    a division by 336, and duration_s=900 makes one day 15 minutes."""
    if duration_s <= 0 or days <= 0:
        raise ValueError("duration_s and days must be positive")
    return np.asarray(times, dtype=np.float64) / days / (DAY / duration_s)


def thin(items: Sequence[T] | np.ndarray, target: int, seed: int) -> list[T] | np.ndarray:
    """A seeded uniform sample without replacement of exactly ``target`` of ``items`` (all of
    them when there are fewer), in their original (time) order; an array gives an array."""
    n = len(items)
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    keep = (np.arange(n) if target >= n else
            np.sort(np.random.default_rng(seed).choice(n, size=target, replace=False)))
    if isinstance(items, np.ndarray):
        return items[keep]
    return [items[i] for i in keep.tolist()]


def quotas(shares: Sequence[float], target: int) -> list[int]:
    """``target`` split in proportion to ``shares`` (non-negative, not all zero) by largest
    remainder: the counts sum to ``target`` exactly; ties go to the earlier share."""
    w = np.asarray(shares, dtype=np.float64)
    if target < 0 or len(w) == 0 or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"need target >= 0 and non-negative shares, got {target}, {shares}")
    exact = w / w.sum() * target
    out = np.floor(exact).astype(np.int64)
    rest = np.argsort(-(exact - out), kind="stable")[: target - int(out.sum())]
    out[rest] += 1
    return out.tolist()


def thin_by_group(items: np.ndarray, groups: np.ndarray, shares: Sequence[float], target: int,
                  seed: int) -> np.ndarray:
    """A seeded sample of ``target`` of ``items`` (all of them when there are fewer) in which
    group g (``groups[i]`` in 0..len(shares)-1) gets ``quotas(shares, target)[g]`` items, each
    group a uniform sample of its own items; a group with fewer items than its quota gives all
    of them and its shortfall goes to the other groups in proportion to their shares. The kept
    items stay in their original (time) order."""
    items, groups = np.asarray(items), np.asarray(groups, dtype=np.int64)
    n, k = len(items), len(shares)
    if len(groups) != n or (n and (groups.min() < 0 or groups.max() >= k)):
        raise ValueError("groups must give every item a group in 0..len(shares)-1")
    if target >= n:
        return items.copy()
    members = [np.flatnonzero(groups == g) for g in range(k)]
    share = np.asarray(shares, dtype=np.float64)
    want = np.zeros(k, dtype=np.int64)
    open_ = [g for g in range(k) if share[g] > 0 or not share.any()]
    left = target
    while left > 0 and open_:
        q = quotas([share[g] if share.any() else 1.0 for g in open_], left)
        full = []
        for g, c in zip(open_, q):
            room = len(members[g]) - int(want[g])
            want[g] += min(c, room)
            left -= min(c, room)
            if c >= room:
                full.append(g)
        open_ = [g for g in open_ if g not in full]
    rng = np.random.default_rng([seed, 2])
    keep = np.sort(np.concatenate(
        [np.empty(0, dtype=np.int64)] +
        [rng.choice(members[g], size=int(want[g]), replace=False) for g in range(k)]))
    return items[keep]
