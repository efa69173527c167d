"""The Azure Functions 2021 invocation trace (AzureFunctionsInvocationTraceForTwoWeeksJan2021,
Azure/AzurePublicDataset, CC-BY): one CSV with columns ``app, func, end_timestamp, duration``
(seconds from the trace start). An invocation arrives at end_timestamp - duration. It is an
optional input: no package ships it (`synthetic.py` makes a trace of the same shape)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = ("app", "func", "end_timestamp", "duration")


@dataclass(frozen=True)
class Invocations:
    """Arrival times (s, sorted) and, per arrival, the index of its function; ``functions``
    are (app, func) keys in order of first appearance (func alone is unique only in an app)."""

    times: np.ndarray
    function: np.ndarray
    functions: tuple[tuple[str, str], ...]


def from_pairs(keys: list[tuple[str, str]], times: list[float] | np.ndarray) -> Invocations:
    """Invocations of (key, arrival) pairs in any order."""
    t = np.asarray(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    index: dict[tuple[str, str], int] = {}
    fn = np.empty(len(order), dtype=np.int64)
    for j, i in enumerate(order):
        fn[j] = index.setdefault(keys[i], len(index))
    return Invocations(t[order], fn, tuple(index))


def load_azure(path: str | Path) -> Invocations:
    """Read the CSV (streamed; ~2M rows is fine). A missing column or a malformed row is a
    ValueError naming the file and line."""
    keys: list[tuple[str, str]] = []
    times: list[float] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(COLUMNS)}")
        for row in reader:
            try:
                end, dur = float(row["end_timestamp"]), float(row["duration"])
                if row["app"] is None or row["func"] is None:
                    raise TypeError
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{reader.line_num}: malformed row {row}") from None
            keys.append((row["app"], row["func"]))
            times.append(end - dur)
    if not times:
        raise ValueError(f"{path}: no invocations")
    return from_pairs(keys, times)
