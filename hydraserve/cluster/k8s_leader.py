"""Leadership on Kubernetes: a ``coordination.k8s.io/v1`` Lease, acquired and renewed as
client-go's leader election does (`hydraserve.cluster.leader.Leadership`).

The Lease (``<gateway_name>-leader`` in the gateway's namespace) names its holder
(``holderIdentity``), when it took the lease (``acquireTime``), when it last renewed it
(``renewTime``), for how long a renewal holds (``leaseDurationSeconds``) and how often the lease
changed hands (``leaseTransitions``). The rules, each one API call on the Lease:

- a contender takes the Lease when there is none (create), when its ``holderIdentity`` is empty
  (a leader released it) or when its ``renewTime + leaseDurationSeconds`` has passed (the leader
  stopped renewing: it crashed, or lost the API server), writing itself as the holder and adding
  one to ``leaseTransitions``;
- every write names the ``resourceVersion`` it read, so of two contenders that read the same
  Lease one wins and the other gets 409 Conflict and does not lead (optimistic concurrency);
- the leader renews every ``retry_period`` seconds (``renewTime``, in a background thread
  started by `acquire` or `try_acquire`); once no renewal succeeded for ``renew_deadline``
  seconds, or the Lease names another holder, it no longer leads (`held` is False) - before
  any contender may take the Lease, since renew_deadline < lease_duration;
- `release` clears ``holderIdentity`` (client-go's ReleaseOnCancel), so a standby takes over at
  its next try instead of after the lease duration.

Defaults are client-go's (15 s lease, 10 s renew deadline, 2 s retry period); unlike client-go
the standby's retries are not jittered, so a takeover after a crash comes within
lease_duration + retry_period of the leader's last renewal. Expiry is judged by ``renewTime``
against the contender's clock: the gateways' clocks must agree to well within the lease
duration (as NTP gives).

On Kubernetes `standby_waiting` is always True: the gateway's Deployment brings a gateway back
whenever one ends, and the worker pods outlive a gateway for their orphan grace
(`ClusterConfig.orphan_grace_s`), so a leader told to stop hands the cluster over (detach)
rather than stopping it.
"""
from __future__ import annotations

import datetime
import json
import logging
import re
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hydraserve.cluster.kubernetes import KubernetesCluster

log = logging.getLogger("hydraserve.cluster")

LEASE_DURATION_S = 15  # client-go's defaults
RENEW_DEADLINE_S = 10.0
RETRY_PERIOD_S = 2.0
HOLDER_CACHE_S = 0.1  # holder() reads the Lease at most this often (a handover polls it)


def lease_name(gateway_name: str) -> str:
    """The Lease of a gateway name's leadership, as a DNS subdomain."""
    base = re.sub(r"[^a-z0-9.-]", "-", gateway_name.lower()).strip("-.")[:240] or "hydraserve"
    return f"{base}-leader"


def micro_time(t: datetime.datetime) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str | None) -> datetime.datetime | None:
    if not s:
        return None
    try:
        t = datetime.datetime.fromisoformat(s)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class KubernetesLeadership:
    """`Leadership` through the Lease ``name`` in ``namespace``. ``api_client``: a configured
    ``kubernetes.client.ApiClient``; ``identity``: this contender's ``holderIdentity`` (default:
    the host name, the pod's name in a pod, and a random suffix)."""

    def __init__(self, api_client, namespace: str, name: str, identity: str | None = None,
                 lease_duration: int = LEASE_DURATION_S, renew_deadline: float = RENEW_DEADLINE_S,
                 retry_period: float = RETRY_PERIOD_S) -> None:
        from kubernetes import client

        if not (int(lease_duration) == lease_duration and lease_duration >= 1):
            raise ValueError(f"lease_duration must be whole seconds >= 1, got {lease_duration}")
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration, got "
                             f"{retry_period}, {renew_deadline}, {lease_duration}")
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name = namespace, name
        self.identity = identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:12]}"
        self.lease_duration, self.renew_deadline = int(lease_duration), renew_deadline
        self.retry_period = retry_period
        self.request_timeout = max(1.0, renew_deadline / 2)
        self._io = threading.Lock()  # one attempt on the Lease at a time
        self._leading = False
        self._renewed = float("-inf")  # monotonic start of the last successful write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._holder_seen: tuple[float, str | None] = (float("-inf"), None)

    @classmethod
    def for_backend(cls, backend: "KubernetesCluster", **kw) -> "KubernetesLeadership":
        """The leadership of the gateways of ``backend``'s gateway name, in its namespace,
        through its API client."""
        return cls(backend.core.api_client, backend.ns, lease_name(backend.kcfg.gateway_name),
                   **kw)

    # -- the protocol --------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        if self.held():
            return True
        with self._io:
            if not self._attempt():
                return False
            self._leading = True
        log.info("leader election: %s leads (Lease %s/%s)", self.identity, self.namespace,
                 self.name)
        self._start_renewing()
        return True

    def acquire(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            if self.try_acquire():
                return True
            stop.wait(self.retry_period)
        return False

    def held(self) -> bool:
        return self._leading and time.monotonic() - self._renewed < self.renew_deadline

    def release(self) -> None:
        was = self._leading
        self._leading = False
        self._stop_renewing()
        if not was:
            return
        with self._io:
            try:
                lease = self._read()
                spec = (lease or {}).get("spec") or {}
                if lease is None or spec.get("holderIdentity") != self.identity:
                    return  # someone else holds it by now
                now = micro_time(_now())
                lease["spec"] = {"holderIdentity": "", "leaseDurationSeconds": 1,
                                 "acquireTime": now, "renewTime": now,
                                 "leaseTransitions": spec.get("leaseTransitions") or 0}
                self._replace(lease)
                log.info("leader election: %s released the Lease %s/%s", self.identity,
                         self.namespace, self.name)
            except Exception as e:  # noqa: BLE001 - it then expires by itself
                log.warning("leader election: releasing the Lease %s/%s failed (%s); it "
                            "expires in %d s", self.namespace, self.name, e, self.lease_duration)

    def standby_waiting(self) -> bool:
        """Always True on Kubernetes: a Deployment brings a gateway back whenever one ends, and
        worker pods wait for it within their orphan grace (see the module's docstring)."""
        return True

    def holder(self) -> str | None:
        """The Lease's ``holderIdentity`` while its lease holds (None: nobody, expired, or the
        API did not answer)."""
        if self.held():
            return self.identity
        seen, holder = self._holder_seen
        if time.monotonic() - seen < HOLDER_CACHE_S:
            return holder
        try:
            spec = (self._read() or {}).get("spec") or {}
        except Exception:  # noqa: BLE001 - unknown
            return None
        holder = spec.get("holderIdentity") or None
        if holder is not None and self._expired(spec, _now()):
            holder = None
        self._holder_seen = (time.monotonic(), holder)
        return holder

    # -- one attempt: client-go's tryAcquireOrRenew ----------------------------------------------
    def _attempt(self) -> bool:
        """Create, take over or renew the Lease; whether this contender holds it now."""
        from kubernetes.client.rest import ApiException

        started, now = time.monotonic(), _now()
        try:
            lease = self._read()
            if lease is None:
                self._create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                              "metadata": {"name": self.name, "namespace": self.namespace},
                              "spec": self._spec(now, now, 0)})
            else:
                spec = lease.get("spec") or {}
                holder = spec.get("holderIdentity") or ""
                transitions = int(spec.get("leaseTransitions") or 0)
                if holder == self.identity:  # a renewal
                    acquired = parse_time(spec.get("acquireTime")) or now
                else:
                    if holder and not self._expired(spec, now):
                        if self._leading:
                            log.warning("leader election: the Lease %s/%s is %s's now",
                                        self.namespace, self.name, holder)
                            self._leading = False
                        return False
                    acquired, transitions = now, transitions + 1
                lease["spec"] = self._spec(acquired, now, transitions)
                self._replace(lease)  # names the resourceVersion it read
        except ApiException as e:
            if e.status == 409:  # another contender wrote first
                log.debug("leader election: %s lost a race for %s: %s", self.identity,
                          self.name, e.reason)
            else:
                self._note_error(f"{e.status} {e.reason}")
            return False
        except Exception as e:  # noqa: BLE001 - the API server unreachable, a timeout
            self._note_error(f"{type(e).__name__}: {e}")
            return False
        self._renewed, self._last_error = started, None
        return True

    def _spec(self, acquired: datetime.datetime, now: datetime.datetime,
              transitions: int) -> dict:
        return {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_duration,
                "acquireTime": micro_time(acquired), "renewTime": micro_time(now),
                "leaseTransitions": transitions}

    def _expired(self, spec: dict, now: datetime.datetime) -> bool:
        renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
        if renewed is None:
            return True
        duration = spec.get("leaseDurationSeconds") or self.lease_duration
        return renewed + datetime.timedelta(seconds=duration) <= now

    def _note_error(self, what: str) -> None:
        """An API error: a warning when it is a new one, debug while it repeats."""
        level = logging.DEBUG if what == self._last_error else logging.WARNING
        log.log(level, "leader election on the Lease %s/%s: %s", self.namespace, self.name, what)
        self._last_error = what

    # -- the Lease through the API ---------------------------------------------------------------
    def _read(self) -> dict | None:
        from kubernetes.client.rest import ApiException

        try:
            resp = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False,
                                                  _request_timeout=self.request_timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def _create(self, body: dict) -> None:
        self.api.create_namespaced_lease(self.namespace, body, _preload_content=False,
                                         _request_timeout=self.request_timeout)

    def _replace(self, body: dict) -> None:
        self.api.replace_namespaced_lease(self.name, self.namespace, body, _preload_content=False,
                                          _request_timeout=self.request_timeout)

    # -- the renewal thread ------------------------------------------------------------------------
    def _start_renewing(self) -> None:
        self._stop_renewing()
        self._stop = stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, args=(stop,), daemon=True,
                                        name="hydraserve-leader-lease")
        self._thread.start()

    def _stop_renewing(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.request_timeout + self.retry_period + 1)

    def _renew_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.retry_period):
            with self._io:
                if stop.is_set() or not self._leading:
                    return
                if self._attempt():
                    continue
            if not self._leading or time.monotonic() - self._renewed >= self.renew_deadline:
                self._leading = False
                log.warning("leader election: %s no longer leads (no renewal of the Lease %s/%s "
                            "for %.1f s)", self.identity, self.namespace, self.name,
                            time.monotonic() - self._renewed)
                return
