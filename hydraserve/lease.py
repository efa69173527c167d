"""Leases: nothing a control plane starts outlives it by accident (standard library only).

Every process a control plane starts (store, agents, workers, warm runtimes) holds a lease that
its control plane renews as part of its tick. One whose lease has not been renewed for
``grace`` seconds is an orphan: it exits by itself, the same clean way as on SIGTERM (an agent
frees its shared memory, a worker its regions). A control plane that comes back within the grace
(a restart, a standby taking over) renews the same lease and adopts the processes.

Two kinds of renewal, one rule:
  a file     (the local backend) the control plane touches the file: its mtime is the renewal;
             a missing file counts from when it was last seen
  in memory  (a process the control plane reaches over the network, a Kubernetes pod) the
             control plane calls the process's ``POST /lease``, which calls `Lease.renew`
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("hydraserve")

ORPHAN_GRACE_S = 60.0  # serve --orphan-grace's default
RENEW_EVERY_S = 1.0  # how often a control plane renews (at most; its tick drives it)
CHECK_EVERY_S = 1.0  # how often a holder looks at its lease


class Lease:
    """A holder's view of its lease: lapsed once ``grace`` seconds pass with no renewal."""

    def __init__(self, grace: float, path: str | Path | None = None,
                 clock=time.time) -> None:
        if grace <= 0:
            raise ValueError(f"a lease's grace must be positive, got {grace}")
        self.grace, self.path, self._clock = grace, Path(path) if path else None, clock
        self._renewed = clock()

    def renew(self) -> None:
        """An in-memory renewal (``POST /lease``)."""
        self._renewed = self._clock()

    def age(self) -> float:
        """Seconds since the last renewal (a file's mtime, or `renew`)."""
        if self.path is not None:
            try:
                self._renewed = max(self._renewed, self.path.stat().st_mtime)
            except OSError:  # removed: it counts from when it was last seen
                pass
        return max(0.0, self._clock() - self._renewed)

    def lapsed(self) -> bool:
        return self.age() > self.grace

    def args(self) -> list[str]:
        """The command-line flags that give a child process this lease (see `add_arguments`)."""
        out = ["--orphan-grace", f"{self.grace:g}"]
        return out + ["--lease", str(self.path)] if self.path is not None else out


def renew_file(path: str | Path) -> None:
    """The control plane's side of a file lease: touch it (create it if it is missing)."""
    path = Path(path)
    try:
        os.utime(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def add_arguments(p, what: str) -> None:
    """``--lease`` and ``--orphan-grace`` for a server a control plane starts."""
    p.add_argument("--lease", default=None, metavar="FILE",
                   help=f"a lease file its control plane keeps touching: the {what} exits by "
                        "itself (cleanly, as on SIGTERM) once it was not touched for "
                        "--orphan-grace seconds (default: no lease file)")
    p.add_argument("--orphan-grace", type=float, default=None, metavar="S",
                   help="with --lease: seconds without a renewal after which it exits; without "
                        "--lease: its control plane renews it with POST /lease (default: no "
                        "lease, it runs until stopped)")


def from_args(args) -> Lease | None:
    """The lease the flags of `add_arguments` give (None: none)."""
    lease, grace = getattr(args, "lease", None), getattr(args, "orphan_grace", None)
    if lease is None and grace is None:
        return None
    return Lease(grace or ORPHAN_GRACE_S, lease)
