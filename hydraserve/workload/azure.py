"""The Azure Functions 2021 invocation trace (``AzureFunctionsInvocationTraceForTwoWeeksJan2021``,
Azure/AzurePublicDataset, CC-BY): one CSV with a header and columns ``app, func, end_timestamp,
duration`` (seconds from the trace start). An invocation arrives at ``end_timestamp - duration``.
It is an optional input: no package ships it (``synthetic.py`` makes a trace of the same shape).

A function is the pair (app, func): the dataset documents ``func`` as unique only within its
``app`` (the artifact keyed functions by ``func`` alone, merging functions of different apps).

Invocations are held column-wise (arrival times and a function index per arrival) rather than
as a list of (key, time) objects: the real file has about 2 million rows, which as Python
objects would take hundreds of MB; columns take 16 bytes a row. Iterating an ``Invocations``
still yields ``Invocation(key, time)`` pairs.
"""
from __future__ import annotations

import csv
import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

COLUMNS = ("app", "func", "end_timestamp", "duration")
FunctionKey = tuple[str, str]  # (app, func)


class Invocation(NamedTuple):
    key: FunctionKey
    time: float  # arrival, seconds from the trace start


@dataclass(frozen=True, eq=False)
class Invocations:
    """Arrival times (s, sorted ascending) and, per arrival, the index of its function in
    ``functions``: the (app, func) keys in order of first appearance in the input (the order
    that decides the endpoint blocks, PAPER.md 14)."""

    times: np.ndarray  # float64, sorted
    function: np.ndarray  # int64, index into ``functions``
    functions: tuple[FunctionKey, ...]

    def __len__(self) -> int:
        return len(self.times)

    def __iter__(self) -> Iterator[Invocation]:
        for f, t in zip(self.function.tolist(), self.times.tolist()):
            yield Invocation(self.functions[f], t)

    def between(self, start: float, end: float) -> Invocations:
        """The invocations arriving in [start, end); functions without one are dropped (the
        others keep their order)."""
        keep = (self.times >= start) & (self.times < end)
        return _renumbered(self.times[keep], self.function[keep], self.functions)


def _renumbered(times: np.ndarray, fn: np.ndarray, keys: tuple[FunctionKey, ...]
                ) -> Invocations:
    """Invocations of the functions that occur in ``fn``, renumbered keeping their order."""
    used = np.zeros(len(keys), dtype=bool)
    used[fn] = True
    new_index = np.cumsum(used) - 1
    return Invocations(times, new_index[fn].astype(np.int64),
                       tuple(k for k, u in zip(keys, used) if u))


def _sorted(times: Iterable[float], codes: Iterable[int], keys: list[FunctionKey]
            ) -> Invocations:
    t = np.asarray(times, dtype=np.float64)
    fn = np.asarray(codes, dtype=np.int64)
    order = np.argsort(t, kind="stable")
    return Invocations(t[order], fn[order], tuple(keys))


def from_pairs(pairs: Iterable[tuple[FunctionKey, float]]) -> Invocations:
    """Invocations of (key, arrival time) pairs (e.g. ``Invocation``s) in any time order;
    functions are numbered in order of first appearance in ``pairs``."""
    index: dict[FunctionKey, int] = {}
    times: list[float] = []
    codes: list[int] = []
    for key, t in pairs:
        codes.append(index.setdefault((str(key[0]), str(key[1])), len(index)))
        times.append(float(t))
    return _sorted(times, codes, list(index))


def load_azure(path: str | Path) -> Invocations:
    """Read the trace CSV, streamed (the ~2M-row file takes a few seconds and ~50 MB).
    Functions are numbered in order of first appearance in the file, as the artifact did. A
    missing column, a short row, an empty key or a non-finite number is a ValueError naming the
    file and line."""
    index: dict[FunctionKey, int] = {}
    times = array("d")
    codes = array("q")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {missing}; expected a header with "
                             f"{list(COLUMNS)}, got {header}")
        ia, ifn, iend, idur = (header.index(c) for c in COLUMNS)
        width = max(ia, ifn, iend, idur) + 1
        for row in reader:
            if not row:
                continue
            try:
                if len(row) < width:
                    raise ValueError(f"{len(row)} fields, expected {len(header)}")
                app, func = row[ia].strip(), row[ifn].strip()
                if not app or not func:
                    raise ValueError("empty app or func")
                end, dur = float(row[iend]), float(row[idur])
                if not (math.isfinite(end) and math.isfinite(dur)):
                    raise ValueError("non-finite timestamp or duration")
            except ValueError as e:
                raise ValueError(f"{path}:{reader.line_num}: malformed row {row!r}: {e}"
                                 ) from None
            codes.append(index.setdefault((app, func), len(index)))
            times.append(end - dur)
    if not times:
        raise ValueError(f"{path}: no invocations")
    return _sorted(np.frombuffer(times, dtype=np.float64),
                   np.frombuffer(codes, dtype=np.int64), list(index))
