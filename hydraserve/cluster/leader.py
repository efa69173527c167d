"""Leadership of a cluster: one gateway leads (admits requests, runs the control plane), the
others wait as standbys and take over when it goes.

Leadership is a lock that dies with its holder. Locally it is a file lock (``flock``) in the
cluster's folder: the kernel releases it the moment the leader's process ends, however it ends,
so a takeover is not bounded by a timeout. On Kubernetes it is a ``coordination.k8s.io/v1``
Lease (`hydraserve.cluster.k8s_leader`), acquired and renewed as client-go's leader election
does. A standby announces itself (locally a shared lock on a second file), so a leader that is
told to stop (SIGTERM) knows whether to hand the cluster over or to stop it.
"""
from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Protocol

POLL_S = 0.05  # how often a waiting standby tries the lock (a try costs one system call)


class Leadership(Protocol):
    identity: str  # who this contender is (in logs and in the Lease's holderIdentity)

    def try_acquire(self) -> bool:
        """One attempt to lead; True when this contender leads (now, or already)."""

    def acquire(self, stop: threading.Event) -> bool:
        """Wait as a standby until this contender leads (True) or ``stop`` is set (False)."""

    def held(self) -> bool:
        """Whether it still leads (a Lease that could not be renewed in time is lost)."""

    def release(self) -> None:
        """Stop leading at once, so a standby takes over now; idempotent."""

    def standby_waiting(self) -> bool:
        """Whether another contender waits to take over."""

    def holder(self) -> str | None:
        """Who leads now, as far as this contender can tell (None: nobody, or unknown)."""


class FileLeadership:
    """A leader lock in ``folder``: ``leader.lock`` (exclusive, held by the leader, with its
    identity written in ``leader``) and ``standby.lock`` (shared, held by each waiting
    standby)."""

    def __init__(self, folder: str | Path, identity: str | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.identity = identity or f"gateway pid {os.getpid()}"
        self._fd: int | None = None
        self._standby_fd: int | None = None
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self._fd is not None:
                return True
            fd = os.open(self.folder / "leader.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._fd = fd
            os.set_inheritable(fd, False)  # a child must not hold the lock after we die
            self._leave_standby()
        self.announce(self.identity)
        return True

    def announce(self, text: str) -> None:
        """What `holder` tells the others while this contender leads (its identity first)."""
        tmp = self.folder / f".leader.{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, self.folder / "leader")

    def acquire(self, stop: threading.Event) -> bool:
        with self._lock:
            if self._fd is None and self._standby_fd is None:
                fd = os.open(self.folder / "standby.lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_SH)
                self._standby_fd = fd
        while not stop.is_set():
            if self.try_acquire():
                return True
            stop.wait(POLL_S)
        with self._lock:
            self._leave_standby()
        return False

    def _leave_standby(self) -> None:
        if self._standby_fd is not None:
            os.close(self._standby_fd)  # closing the descriptor drops its lock
            self._standby_fd = None

    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def standby_waiting(self) -> bool:
        fd = os.open(self.folder / "standby.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # someone holds it shared: a standby waits
        finally:
            os.close(fd)  # also drops the lock when it was taken
        return False

    def holder(self) -> str | None:
        if self._fd is not None:
            return self.identity
        fd = os.open(self.folder / "leader.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return (self.folder / "leader").read_text() or None
            except OSError:
                return None
        finally:
            os.close(fd)
        return None
