"""A seeded synthetic invocation trace with the Azure Functions trace's shape, for users
without the real file: many functions, heavy-tailed per-function rates (a few functions carry
most invocations), a diurnal cycle, and bursty minutes (each function switches between quiet
and bursts). Defaults (all our choice): 1,000 functions over 14 days, lognormal rates with sigma
1, ~300,000 invocations, made in about a second. Every function is also invoked once at a random
time in the first hour, so that the order of first appearance (which decides the endpoint
blocks) does not simply sort the functions by rate; without it the heaviest functions would all
land on the first application's endpoints."""
from __future__ import annotations

import numpy as np

from hydraserve.workload.azure import Invocations

DAY = 86400.0


def synthetic_invocations(seed: int = 0, days: float = 14.0, functions: int = 1000,
                          mean_total: float = 300_000.0, burst_fraction: float = 0.3,
                          burst_factor: float = 20.0) -> Invocations:
    """Per function: a rate from a lognormal (sigma 1: heavy tail) scaled so all functions
    together expect ``mean_total`` invocations; per minute a diurnal factor (1 +- 0.5) and,
    with probability ``burst_fraction`` per 10-minute block, a burst of ``burst_factor`` x the
    rate; Poisson counts per minute, uniform times inside the minute."""
    rng = np.random.default_rng(seed)
    span = days * DAY
    minutes = int(span // 60)
    weights = rng.lognormal(0.0, 1.0, functions)
    rates = weights / weights.sum() * mean_total / span  # per second
    t_min = np.arange(minutes) * 60.0
    diurnal = 1.0 + 0.5 * np.sin(2 * np.pi * t_min / DAY)
    all_times, all_fn = [], []
    blocks = (minutes + 9) // 10
    for f in range(functions):
        burst = rng.random(blocks) < burst_fraction
        factor = np.where(np.repeat(burst, 10)[:minutes], burst_factor, 1.0)
        lam = rates[f] * 60.0 * diurnal * factor
        lam *= rates[f] * 60.0 * minutes / lam.sum()  # bursts move load, they do not add it
        counts = rng.poisson(lam)
        n = int(counts.sum())
        starts = np.repeat(t_min, counts)
        first_hour = rng.uniform(0, 3600.0, 1)
        all_times.append(np.concatenate([first_hour, starts + rng.uniform(0, 60.0, n)]))
        all_fn.append(np.full(n + 1, f, dtype=np.int64))
    times = np.concatenate(all_times)
    fn = np.concatenate(all_fn)
    order = np.argsort(times, kind="stable")
    times, fn = times[order], fn[order]
    # functions renumbered in order of first appearance, as the real trace's loader does
    first = {}
    for f in fn:
        first.setdefault(int(f), len(first))
    remap = np.array([first.get(f, -1) for f in range(functions)], dtype=np.int64)
    keys = [None] * len(first)
    for f, i in first.items():
        keys[i] = (f"app{f // 4}", f"func{f}")
    return Invocations(times, remap[fn], tuple(keys))
