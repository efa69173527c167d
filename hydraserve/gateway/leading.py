"""Who serves: leadership of a cluster between gateways (`hydraserve serve` and `serve
--standby`), the listening socket a successor can share, and the handover of a rolling restart.

Locally a cluster is named by its gateway's port: its folder is CACHE/clusters/port-PORT (the
record, the lease, the leader lock). A gateway on port 0 has a temporary cluster of its own:
nothing can take it over. On Kubernetes the cluster is the namespace and leadership a Lease.

A leader binds its port with SO_REUSEPORT, so its successor binds the same port before the
leader closes its socket: on a handover (SIGTERM with a standby waiting) the old leader releases
leadership at once, waits until the new leader listens, then stops accepting and finishes the
streams it relays, on instances that stay warm for the new leader.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from hydraserve.cluster.leader import FileLeadership, Leadership

if TYPE_CHECKING:
    from hydraserve.gateway.app import Gateway

log = logging.getLogger("hydraserve")

LISTENING = "listening on"  # in a leader's identity once its socket is bound
TAKEOVER_WAIT_S = 10.0  # the longest an old leader waits for its successor to listen
LEADERSHIP_CHECK_S = 0.5  # how often a leader checks that it still leads


class Refused(Exception):
    """serve cannot start as asked; the message says why (logged, exit status 2)."""


def cluster_home(cache_root: Path, port: int) -> Path | None:
    """The folder of the local cluster served on ``port`` (None for port 0: a temporary one)."""
    return None if port == 0 else cache_root / "clusters" / f"port-{port}"


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that the next leader of the same cluster can bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def lead(leadership: Leadership, standby: bool, stop: threading.Event) -> bool:
    """Lead, or with ``standby`` wait to; False when ``stop`` came first. Refused when another
    gateway leads and this one is not a standby."""
    if leadership.try_acquire():
        return True
    holder = leadership.holder() or "another gateway"
    if not standby:
        raise Refused(f"{holder} already leads this cluster: stop it first, or add --standby to "
                      "wait as its standby and take over when it goes")
    log.info("standby: %s leads; waiting to take over", holder)
    t0 = time.monotonic()
    if not leadership.acquire(stop):
        return False
    log.info("standby: leading now (after %.1f s as a standby); adopting the cluster",
             time.monotonic() - t0)
    return True


def announce(leadership: Leadership, url: str) -> None:
    """Tell the old leader (waiting in `hand_over`) that this one listens now."""
    if isinstance(leadership, FileLeadership):
        leadership.announce(f"{leadership.identity} {LISTENING} {url}")


def hand_over(leadership: Leadership) -> bool:
    """On SIGTERM: with a standby waiting, release leadership and wait until the successor
    listens (True: hand the cluster over); without one, False (stop the cluster)."""
    if not leadership.held() or not leadership.standby_waiting():
        return False
    me = leadership.identity
    leadership.release()
    log.info("a standby waits: handing the cluster over")
    deadline = time.monotonic() + TAKEOVER_WAIT_S
    while time.monotonic() < deadline:
        holder = leadership.holder()
        if holder and holder.split(f" {LISTENING}")[0] != me and \
                (LISTENING in holder or not isinstance(leadership, FileLeadership)):
            log.info("the new leader listens (%s): closing this gateway's socket", holder)
            return True
        time.sleep(0.02)
    if isinstance(leadership, FileLeadership) and leadership.try_acquire():
        log.warning("no standby took over within %.0f s: stopping the cluster after all",
                    TAKEOVER_WAIT_S)
        return False
    # a Lease: the next gateway (a Deployment brings one) adopts the pods within their grace
    log.warning("no gateway took over within %.0f s: the cluster is left to the next one (its "
                "processes wait for the orphan grace)", TAKEOVER_WAIT_S)
    return True


def run_server(gateway: Gateway, sock: socket.socket, ready: Callable[[], None], grace: float,
               leadership: Leadership | None = None, url: str = "") -> None:
    """Serve until SIGINT/SIGTERM; then open requests get ``grace`` seconds to finish. With a
    standby waiting, SIGTERM hands the cluster over (`hand_over`) instead of stopping it; a
    leader that loses its leadership (a Lease it could not renew) leaves the cluster to the new
    one the same way."""
    import signal

    import uvicorn

    from hydraserve.gateway.app import create_app

    def on_ready() -> None:
        if leadership is not None:
            announce(leadership, url)
        ready()

    # a backstop: uvicorn cancels what is still running this long after the signal
    config = uvicorn.Config(create_app(gateway, on_ready), log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=grace + 10)

    class Server(uvicorn.Server):
        handing = False  # a handover is under way (a second signal must not stop the cluster)

        def handle_exit(self, sig, frame) -> None:
            if self.handing:
                return
            if leadership is not None and sig == signal.SIGTERM and leadership.held() and \
                    leadership.standby_waiting():
                # waiting for the successor must not block the loop: the streams go on
                self.handing = True
                threading.Thread(target=self._hand_over, args=(sig, frame), daemon=True,
                                 name="hand-over").start()
                return
            gateway.begin_drain(grace)  # open streams end with a final event, not a cut
            super().handle_exit(sig, frame)

        def _hand_over(self, sig, frame) -> None:
            if hand_over(leadership):
                gateway.hand_over()
            gateway.begin_drain(grace)
            super().handle_exit(sig, frame)

        def watch_leadership(self) -> None:
            while not self.should_exit and not self.handing:
                if not leadership.held():
                    log.error("leadership lost (%s leads now): leaving the cluster to it",
                              leadership.holder() or "another gateway")
                    self.handing = True
                    gateway.hand_over()
                    gateway.begin_drain(grace)
                    super().handle_exit(signal.SIGTERM, None)
                    return
                time.sleep(LEADERSHIP_CHECK_S)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM (running our cleanup), then re-raises the
    # signal to the handler it found: make that a no-op so a clean stop exits with status 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server = Server(config)
    if leadership is not None:
        threading.Thread(target=server.watch_leadership, daemon=True,
                         name="leadership").start()
    try:
        server.run(sockets=[sock])
    finally:
        if leadership is not None:
            leadership.release()
