"""Test helpers around real server processes: shared-memory checks and a connection-cutting proxy."""
from __future__ import annotations

import asyncio
import os
import threading

from hydraserve.store.launch import ServerProcess as Server  # noqa: F401 - re-exported


def shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


class CuttingProxy:
    """A TCP proxy on loopback that cuts the first ``cuts`` connections after ``after`` bytes
    of response, to test that fetches resume. Runs its own event loop in a thread."""

    def __init__(self, target_port: int, after: int, cuts: int):
        self.target_port, self.after, self.cuts_left = target_port, after, cuts
        self.cuts_done = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        cut = self.cuts_left > 0
        if cut:
            self.cuts_left -= 1

        async def pipe(src, dst, limit):
            sent = 0
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    if limit is not None and sent + len(data) > limit:
                        dst.write(data[:limit - sent])
                        self.cuts_done += 1
                        break
                    dst.write(data)
                    sent += len(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                for w in (writer, up_w):
                    w.close()

        await asyncio.gather(pipe(reader, up_w, None), pipe(up_r, writer, self.after if cut else None))

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
