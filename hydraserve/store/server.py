"""Running an aiohttp app as a long-lived server: bind, announce the URL, stop cleanly on
SIGINT / SIGTERM (running the app's cleanup hooks, which free shared memory)."""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading

from aiohttp import web

from hydraserve.lease import CHECK_EVERY_S, Lease

log = logging.getLogger("hydraserve")


def json_error(status: int, message: str) -> web.Response:
    """The error shape every hydraserve server answers with: {"error": message}."""
    return web.json_response({"error": message}, status=status)


def require_token(app: web.Application, token: str | None) -> None:
    """With a cluster token, every request must carry "Authorization: Bearer TOKEN" (compared
    in constant time); others get 401. Without one, nothing changes."""
    if not token:
        return
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler):
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return json_error(401, "the cluster token is missing or wrong")
        return await handler(request)

    app.middlewares.append(check)


async def serve(app: web.Application, host: str, port: int, what: str,
                stop: asyncio.Event | None = None, extra: str = "",
                token: str | None = None, cancel_on_disconnect: bool = False,
                lease: Lease | None = None) -> bool:
    """Run until SIGINT/SIGTERM, until ``stop`` is set, or until ``lease`` lapses (its control
    plane is gone: see `hydraserve.lease`; without a lease file, ``POST /lease`` renews it);
    with ``token``, see require_token. ``cancel_on_disconnect``: a handler is cancelled the
    moment its client closes the connection (a streaming handler then stops the work behind it
    without waiting to fail a write). Returns whether it left because its lease lapsed."""
    require_token(app, token)
    if lease is not None and lease.path is None:
        lease.renew()  # its grace counts from now, when its control plane can first renew it

        async def renew(_: web.Request) -> web.Response:
            lease.renew()
            return web.json_response({"renewed": True, "grace": lease.grace})

        app.router.add_post("/lease", renew)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=cancel_on_disconnect)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # the real port when port == 0
    print(f"{what} listening on http://{host}:{bound}{extra}", flush=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    orphaned = asyncio.Event()
    watch = asyncio.create_task(_watch_lease(lease, what, stop, orphaned)) if lease else None
    try:
        await stop.wait()
    finally:
        if watch is not None:
            watch.cancel()
        try:
            await runner.cleanup()
        finally:
            quiet_exit(loop)
    return orphaned.is_set()


async def _watch_lease(lease: Lease, what: str, stop: asyncio.Event,
                       orphaned: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(CHECK_EVERY_S)
        if lease.lapsed():
            log.warning("%s: its control plane has not renewed its lease for %.0f s (grace "
                        "%g s): exiting as an orphan", what, lease.age(), lease.grace)
            orphaned.set()
            stop.set()


def quiet_exit(loop: asyncio.AbstractEventLoop) -> None:
    """On the way out, while the loop is still open: its signal handlers go, which clears the
    signal wake-up fd (closing the loop closes that pipe before it drops its handlers, and a
    signal landing in between was written to a closed, or reused, descriptor: "Exception
    ignored when trying to write to the signal wakeup fd"), and SIGTERM is ignored from here on:
    a second one (a backend stopping a worker that already stops on the first) must not kill
    the process in the middle of its clean exit."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_until(app: web.Application, host: str, port: int, what: str,
              exit_requested: threading.Event, extra: str = "", token: str | None = None,
              cancel_on_disconnect: bool = False, lease: Lease | None = None) -> None:
    """Serve ``app`` (blocking) until SIGINT/SIGTERM, until another thread sets
    ``exit_requested`` or until ``lease`` lapses; on the way out the event is set, so the
    thread watching it ends too."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, lambda: (exit_requested.wait(),
                                            loop.call_soon_threadsafe(stop.set)))
        try:
            await serve(app, host, port, what, stop, extra, token, cancel_on_disconnect, lease)
        finally:
            exit_requested.set()

    asyncio.run(main())  # serve() ignores SIGTERM from its way out on (quiet_exit)
