"""The instance lifecycle log: what the cost analysis charges (PAPER.md 11).

One JSON object per line, written as things happen; ``t`` is in seconds on the log's clock
(the wall clock by default, so a replay's send times and these events share one time axis)::

    {"t", "event": "created", "instance", "model", "p", "policy", "from_cache",
     "stages": [{"rank", "node", "gpu", "gb", "all_card"}]}     GPU memory claimed (paper GB)
    {"t", "event": "ready", "instance"}                             the instance serves
    {"t", "event": "request_end", "instance", "model", "request", "tokens"}   a stream ended
    {"t", "event": "consolidated", "instance", "released": [ranks], "split": [{"rank",
     "instance"}]}      part-card stages freed; other all-card stages became standalone instances
    {"t", "event": "deleted", "instance", "state": "stopped" | "failed", "error"}
    {"t", "event": "adopted", "instance", "model", "p", "stages": [{"rank", "node", "gpu", "gb",
     "all_card", "created", "created_rank"}]}   a new control plane took over the stages that
                        instance "created" made as its rank "created_rank" (control/adoption.py)
    {"t", "event": "released", "instance", "ranks": [ranks]}   stages of it that a new control
                        plane found and stopped (the rest of it was adopted)

A control plane that takes over (a restart, a standby) appends to the same log, so an analysis
accounts every request and instance of a run.

The operator's events go to the same log (`ControlState.emit`; the analysis ignores them)::

    {"t", "event": "fetch", "server", "model", "instance", "bytes", "seconds"}   a stage's fetch
    {"t", "event": "cold_start", "id", "model", "p", "ttft_s", "phases": {...}, "stages": [...],
     ...}                        a cold start at its first token (control/coldstart.py's record)
    {"t", "event": "consolidation", "model", "instance", "outcome", "seconds"}
    {"t", "event": "failure", "kind", "model", ...}

An instance is charged GB x seconds for each stage from its creation until the stage is freed,
but never past 30 s after the last token the stage's instance produced (the keep-alive).
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


class LifecycleLog:
    """Appends lifecycle events to a JSONL file (flushed per event, so a crash loses nothing
    already written). Thread-safe; ``clock`` gives ``t``."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._file: IO[str] | None = None  # opened at the first event (a standby's: once it leads)
        self._closed = False

    def write(self, event: str, **fields) -> None:
        line = json.dumps({"t": round(self._clock(), 6), "event": event, **fields})
        with self._lock:
            if self._closed:
                return
            if self._file is None:
                torn = _ends_torn(self.path)
                self._file = open(self.path, "a", encoding="utf-8")
                if torn:  # a predecessor died mid-line: its torn line stays a line of its own
                    self._file.write("\n")
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None


def _ends_torn(path: Path) -> bool:
    """Whether the file at ``path`` ends inside a line."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                return False
            f.seek(-1, 2)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_lifecycle(path: str | Path) -> list[dict]:
    """The events of a lifecycle log, in order; a torn line (a crash mid-write, the last line,
    or one a successor appended after) is skipped, any other malformed line is an error naming
    the line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) or (line.startswith("{") and not line.rstrip().endswith("}")):
                continue
            raise ValueError(f"{path}:{i}: not a JSON object") from None
    return out
