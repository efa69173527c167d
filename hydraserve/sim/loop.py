"""A virtual-time asyncio event loop: when nothing is runnable it jumps to the next timer.

``VirtualTimeLoop.time()`` starts at 0 and advances only by jumping: ``asyncio.sleep(3600)``
returns at once with the clock an hour later. The loop refuses what would make a simulation
depend on the real world, loudly:

- real I/O: registering any file descriptor besides the loop's own wake-up pipe raises
  `SimulationError` (sockets, subprocess pipes);
- threads: ``run_in_executor`` raises (a thread runs on the wall clock);
- a stall: when no callback is ready and no timer is pending, nothing can ever happen again
  (everything awaits something that only real I/O could bring): it raises instead of hanging;
- the wall clock: `no_wall_clock` replaces the ``time`` module seen by the given modules with
  one whose clocks and sleep raise, so a control-plane code path that reads ``time.monotonic()``
  instead of its injected clock fails the simulation.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import selectors
import types
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class SimulationError(RuntimeError):
    """Something in the simulation reached for the real world (I/O, threads, the wall clock),
    or the simulation can make no more progress."""


class _VirtualSelector(selectors.DefaultSelector):
    """Polls real file descriptors without waiting; a wait for ``timeout`` becomes a jump of
    the loop's virtual clock by ``timeout``."""

    def __init__(self, loop: "VirtualTimeLoop"):
        super().__init__()
        self._vloop = loop
        self._sealed = False  # after the loop's own wake-up pipe, nothing may register
        # the wake-up pipe may hold bytes (written to, or not polled yet); signals can write
        # to it unseen, so with a signal handler it is polled each time
        self.written = True

    def register(self, fileobj, events, data=None):
        if self._sealed:
            raise SimulationError(f"real I/O in the simulation (file descriptor {fileobj!r})")
        self._sealed = True
        return super().register(fileobj, events, data)

    def select(self, timeout: float | None = None):
        if self.written or getattr(self._vloop, "_signal_handlers", None):
            self.written = False
            ready = super().select(0)
            if ready:
                return ready
        if timeout is None:
            raise SimulationError("the simulation stalled: nothing is runnable and no timer "
                                  "is pending (a task waits for something that never comes)")
        if timeout > 0:
            self._vloop._now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time (seconds from 0)."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)
        super().__init__(_VirtualSelector(self))
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._now

    def _write_to_self(self) -> None:
        self._selector.written = True  # poll the pipe at the next select, not each time
        super()._write_to_self()

    def run_in_executor(self, executor, func, *args):
        raise SimulationError(f"a thread in the simulation ({getattr(func, '__name__', func)}): "
                              "threads run on the wall clock")


def run(main: Coroutine[Any, Any, T], start: float = 0.0) -> T:
    """``asyncio.run`` on a fresh `VirtualTimeLoop`."""
    loop = VirtualTimeLoop(start)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _refuse(name: str):
    def refuse(*_a, **_k):
        raise SimulationError(f"time.{name}() read in the simulation: control-plane code must "
                              "use its injected clock")
    return refuse


def _guarded_time() -> types.ModuleType:
    import time as real

    mod = types.ModuleType("time")
    for name in dir(real):
        if not name.startswith("__"):
            setattr(mod, name, getattr(real, name))
    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns",
                 "perf_counter_ns", "sleep"):
        setattr(mod, name, _refuse(name))
    return mod


@contextlib.contextmanager
def no_wall_clock(modules: Iterable[str]) -> Iterator[None]:
    """While active, each named module (imported if it was not) sees a ``time`` whose clocks
    and sleep raise `SimulationError`."""
    guarded = _guarded_time()
    saved = []
    for name in modules:
        mod = importlib.import_module(name)
        if hasattr(mod, "time") and isinstance(mod.time, types.ModuleType):
            saved.append((mod, mod.time))
            mod.time = guarded
    try:
        yield
    finally:
        for mod, orig in saved:
            mod.time = orig
