"""The simulator's virtual-time loop: time jumps instead of passing, and whatever would tie a
simulation to the real world (I/O, threads, the wall clock, a stall) fails loudly."""
from __future__ import annotations

import asyncio
import time

import pytest

from hydraserve.sim.loop import SimulationError, no_wall_clock, run


def test_an_hour_of_timers_takes_no_wall_time():
    async def main():
        loop = asyncio.get_running_loop()
        order = []

        async def at(t):
            await asyncio.sleep(t)
            order.append((t, loop.time()))

        await asyncio.gather(*(at(t) for t in (3600.0, 0.5, 1800.25, 0.0)))
        return order

    wall = time.perf_counter()
    order = run(main())
    assert time.perf_counter() - wall < 1.0
    assert [t for t, _ in order] == [0.0, 0.5, 1800.25, 3600.0]
    assert all(now == pytest.approx(t, abs=1e-6) for t, now in order)


def test_wait_for_times_out_on_virtual_time():
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), timeout=600)
        return asyncio.get_running_loop().time()

    assert run(main(), start=100.0) == pytest.approx(700.0)


@pytest.mark.parametrize("case", ["socket", "thread", "stall"])
def test_the_real_world_is_refused(case):
    async def main():
        if case == "socket":
            await asyncio.open_connection("127.0.0.1", 9)
        elif case == "thread":
            await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0)
        else:
            await asyncio.Event().wait()

    with pytest.raises(SimulationError):
        run(main())


def test_a_wall_clock_read_in_control_code_fails():
    import hydraserve.control.controller as controller

    async def main():
        return controller.time.monotonic()

    with no_wall_clock(["hydraserve.control.controller"]):
        with pytest.raises(SimulationError, match="injected clock"):
            run(main())
    assert controller.time.monotonic() > 0  # restored
