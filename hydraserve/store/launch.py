"""Start ``hydraserve`` servers (store, agents) as child processes and stop them cleanly.

Used by the local cluster, the benchmarks and the tests: a server binds port 0 and prints
'... listening on URL'; we read that line, so any number run side by side.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """``hydraserve ARGS`` in a child process; ``url`` once it announced itself."""

    def __init__(self, args: list[str], log_path: str | Path, timeout: float = 60.0,
                 wait: bool = True, env: dict[str, str] | None = None,
                 stdin_pipe: bool = False):
        """Start the process (``env``: variables added to this one's environment; with
        ``stdin_pipe`` its stdin is ``self.proc.stdin``); with ``wait`` also block until it is
        ready (see wait_ready)."""
        self.args = args
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "hydraserve.cli", *args],
                                     stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     stdin=subprocess.PIPE if stdin_pipe else None,
                                     env={**os.environ, **env} if env else None)
        self.url: str | None = None
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Block until the process printed its URL; raise (and stop it) if it did not."""
        deadline = time.monotonic() + timeout
        while self.url is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.stop()
            raise RuntimeError(f"hydraserve {' '.join(self.args)} did not start:\n"
                               f"{self.log_path.read_text()[-3000:]}")
        return self.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process and wait; kill it if it does not exit. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stdin):
            if f:
                try:
                    f.close()
                except OSError:  # a pipe whose reader is gone
                    pass
        self._log.close()
        return self.proc.returncode


class _Pid:
    """The part of a ``subprocess.Popen`` the cluster uses, for a process this one did not
    start (it was started by a control plane before this one): signals, a liveness poll read
    from /proc, and a wait."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = self.stdin = None

    def poll(self) -> int | None:
        if self.returncode is None and not pid_alive(self.pid):
            self.returncode = -1  # not our child: its real status went to its parent
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode


class AdoptedProcess(ServerProcess):
    """A ``hydraserve`` server started by an earlier control plane, found alive at ``url``: it
    is stopped, polled and signalled like one this process started."""

    def __init__(self, pid: int, url: str | None, args: list[str], log_path: str | Path):
        self.args, self.log_path, self.url = args, Path(log_path), url
        self.proc = _Pid(pid)
        self._log = open(os.devnull, "w")  # its log is the file its first control plane opened

    def wait_ready(self, timeout: float = 60.0) -> str:
        if self.url is None:
            raise RuntimeError(f"pid {self.proc.pid} never announced its URL")
        return self.url


def pid_alive(pid: int, marker: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, with ``marker``, whether its command line holds
    it (a pid reused by another program is not ours)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        if marker is not None:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return marker.encode() in f.read().replace(b"\0", b" ")
    except (OSError, IndexError):
        return False
    return True


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc): what a process started."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out
