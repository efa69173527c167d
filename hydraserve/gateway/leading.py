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

from hydraserve.cluster.leader import FileLeadership, Leadership

log = logging.getLogger("hydraserve")

LISTENING = "listening on"  # in a leader's identity once its socket is bound
TAKEOVER_WAIT_S = 10.0  # the longest an old leader waits for its successor to listen


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
    if leadership.try_acquire():
        log.warning("no standby took over within %.0f s: stopping the cluster after all",
                    TAKEOVER_WAIT_S)
        return False
    return True
