"""Two GPU-side costs of a stock vLLM engine that a CPU stand-in does not have, emulated by the
worker of a scaled testbed (`WorkerSpec.profile_s` and ``load_gbs``; the control plane asks
for them only where the cluster says ``emulate_gpu_costs`` and the preset's runtime is a stock
vLLM engine, with the simulator's constants, `hydraserve.sim.costmodel`):

- the loader's host -> GPU copy: the copy of the arrived weights is paced to take at least
  bytes * size_scale / 1e9 / load_gbs seconds (the paper's GB over the emulated rate);
- the engine's profiling pass and CUDA-graph capture: ``profile_s`` seconds once the weights
  are in, stamped "profiled" in the timeline.

Both waits end early when the worker stops (`Stopped`)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from hydraserve.protocol import WorkerSpec
from hydraserve.worker.timeline import Timeline


class Stopped(RuntimeError):
    """The worker stopped during an emulated wait."""


@dataclass(frozen=True)
class GpuEmulation:
    profile_s: float = 0.0
    load_gbs: float | None = None  # None: the copy is not paced
    size_scale: float = 1.0

    @classmethod
    def of(cls, spec: WorkerSpec) -> GpuEmulation:
        return cls(spec.profile_s or 0.0, spec.load_gbs, spec.size_scale)

    def load_s(self, nbytes: int) -> float:
        """The least seconds a copy of ``nbytes`` real bytes takes (0.0: not paced)."""
        if not self.load_gbs:
            return 0.0
        return nbytes * self.size_scale / 1e9 / self.load_gbs

    def pace_load(self, nbytes: int, started: float, stopping: threading.Event) -> None:
        """Return once the copy of ``nbytes`` begun at ``started`` (time.monotonic) has taken
        `load_s` seconds."""
        left = started + self.load_s(nbytes) - time.monotonic()
        if left > 0 and stopping.wait(left):
            raise Stopped("stopped during the emulated load")

    def profile(self, timeline: Timeline, stopping: threading.Event) -> None:
        """The emulated profiling pass, if any, stamped "profiled" at its end."""
        if self.profile_s <= 0:
            return
        if stopping.wait(self.profile_s):
            raise Stopped("stopped during the emulated profiling pass")
        timeline.mark("profiled")
