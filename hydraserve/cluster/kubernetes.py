"""The Kubernetes backend: workers are pods, created through the official `kubernetes` client.

What it expects in its namespace (scripts/kubernetes/manifests ships it): the model store
(Deployment + Service), a storage agent on every HydraServe node (DaemonSet; the agent and the
workers share the host's IPC and PID namespaces, so a worker maps the agent's shared-memory
regions and the agent sees which reader processes are alive), and nodes labelled by
scripts/kubernetes/label_nodes.py (the labels: hydraserve.cluster.k8s_render).

A worker pod (`k8s_render.worker_pod`) runs ``hydraserve worker`` with the same arguments as a
local worker process, bound to its pod IP, pinned to the chosen node by a required node
affinity, and claims its GPU share as an extended resource (``gpu_resource`` for exclusive GPUs,
``share_resource`` in units of ``share_unit_gb`` for GPUs shared by memory). One watch on the
namespace's HydraServe pods keeps the backend's view current (a 410 Gone relists); a worker is
ready when its pod is Ready (its readiness probe is the worker's /health) and its control API
answers.

The cluster is the record: a worker pod carries this gateway's name as a label and its
`WorkerSpec` as an annotation (`k8s_render`), and nothing is deleted at start. A gateway that
starts (after a crash, or a standby taking over) calls `list_workers`: it adopts every Ready
worker pod of its gateway name and deletes those it cannot adopt. Each worker pod holds an
in-memory lease (``--orphan-grace``) that `renew_lease` renews over HTTP (``POST /lease``,
`http_lease`): a pod whose gateway is gone for longer than the grace, with no successor to adopt
it, exits by itself. `detach` leaves every pod running for the successor; `close` deletes this
gateway's worker pods.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time

from hydraserve.cluster.base import WorkerError, WorkerSpec, model_weights_gb
from hydraserve.cluster.http import HttpApi, HttpServices, HttpWorker
from hydraserve.cluster.http_lease import HttpLeases
from hydraserve.cluster.k8s_render import (COMPONENT, GATEWAY, NODE_SHARE, PART_OF, WORKER_ID,
                                           component, label_value, pod_phase, pod_problem,
                                           pod_ready, pod_spec, servers_from_nodes, unadoptable,
                                           worker_pod)
from hydraserve.config import ClusterConfig, ConfigError, KubernetesConfig, ServerConfig

log = logging.getLogger("hydraserve.cluster")

# every (resource, verb) this backend and its leader election (k8s_leader) call; the Role in
# scripts/kubernetes/manifests/rbac.yaml grants exactly these (plus nodes/patch, for
# label_nodes.py), and a test holds them equal
VERBS = frozenset({("nodes", "list"), ("pods", "create"), ("pods", "get"), ("pods", "list"),
                   ("pods", "watch"), ("pods", "delete"), ("pods/log", "get"),
                   ("leases", "get"), ("leases", "create"), ("leases", "update")})


class KubernetesCluster(HttpServices):
    """`ClusterBackend` on a Kubernetes cluster. ``api_client``: a configured
    ``kubernetes.client.ApiClient`` (see `api_client`)."""

    WATCH_TIMEOUT_S = 10  # each watch request ends after this long and is renewed

    def __init__(self, cfg: ClusterConfig, api_client, token: str | None = None) -> None:
        from kubernetes import client

        self.kcfg = cfg.kubernetes or KubernetesConfig()
        self.ns = self.kcfg.namespace
        self.core = client.CoreV1Api(api_client)
        self._api = HttpApi(token)  # the cluster token, if the pods have one
        self._leases = HttpLeases(self._api, cfg.orphan_grace_s / 4)
        self._pods: dict[str, dict] = {}  # name -> pod, HydraServe's pods in the namespace
        self._ever: set[str] = set()  # names of every pod the watch has shown
        self._cv = threading.Condition()
        self._synced = False
        self._closing = threading.Event()
        self._watch = None
        self._thread: threading.Thread | None = None
        self._workers: dict[str, str] = {}  # worker id -> pod name
        self._models: dict[str, str] = {}  # name -> its folder as the gateway mounts it
        self._run = secrets.token_hex(3)
        nodes = self._raw(self.core.list_node)["items"]
        self._servers, share = servers_from_nodes(nodes, self.kcfg)
        if not self._servers:
            raise ConfigError(f"no node carries the label {NODE_SHARE}: label the GPU nodes "
                              "with scripts/kubernetes/label_nodes.py (SHARE=0|1)")
        self.share = cfg.share if share is None else share
        if share is not None and share != cfg.share:
            log.warning("the nodes are labelled %s=%d: GPUs are %s (the cluster file's `share` "
                        "is ignored)", NODE_SHARE, share, "shared" if share else "exclusive")
        self.cfg = dataclasses.replace(cfg, servers=self._servers, share=self.share)
        self._store_url: str | None = self.kcfg.store_url

    def cluster_config(self) -> ClusterConfig:
        """The cluster file's settings with the servers (and sharing mode) read from the nodes."""
        return self.cfg

    def _raw(self, fn, *args, **kw) -> dict:
        resp = fn(*args, _preload_content=False, _request_timeout=30, **kw)
        return json.loads(resp.data)

    # -- start and the watch ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the watch and wait for the store and every node's agent; worker pods an
        earlier gateway left keep running (`list_workers` adopts them)."""
        self._thread = threading.Thread(target=self._watch_loop, daemon=True,
                                        name="hydraserve-kube-watch")
        self._thread.start()
        deadline = time.monotonic() + self.kcfg.start_timeout_s
        with self._cv:
            while True:
                missing = [s.name for s in self._servers if self._agent(s.name) is None]
                store = self._store_url or self._store_pod_url()
                if self._synced and not missing and store:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    what = [f"no ready storage agent on {', '.join(missing)}"] if missing else []
                    what += [] if store else ["no ready model store"]
                    raise RuntimeError(f"kubernetes namespace {self.ns}: {'; '.join(what)} "
                                       f"after {self.kcfg.start_timeout_s:.0f} s (is "
                                       "scripts/kubernetes/manifests applied?)")
                self._cv.wait(min(left, 1.0))
        log.info("kubernetes cluster: namespace %s, %d servers (%s GPUs), store %s",
                 self.ns, len(self._servers), "shared" if self.share else "exclusive",
                 self.store_url())

    def _watch_loop(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        rv = None
        while not self._closing.is_set():
            try:
                if rv is None:
                    listed = self._raw(self.core.list_namespaced_pod, self.ns,
                                       label_selector=f"{PART_OF}=hydraserve")
                    with self._cv:
                        self._pods = {p["metadata"]["name"]: p for p in listed["items"]}
                        self._ever.update(self._pods)
                        self._synced = True
                        self._cv.notify_all()
                    rv = listed["metadata"]["resourceVersion"]
                self._watch = watch.Watch()
                for ev in self._watch.stream(self.core.list_namespaced_pod, self.ns,
                                             label_selector=f"{PART_OF}=hydraserve",
                                             resource_version=rv, timeout_seconds=self.WATCH_TIMEOUT_S,
                                             _request_timeout=30):
                    pod = ev["raw_object"]
                    rv = pod["metadata"]["resourceVersion"]
                    with self._cv:
                        if ev["type"] == "DELETED":
                            self._pods.pop(pod["metadata"]["name"], None)
                        else:
                            self._pods[pod["metadata"]["name"]] = pod
                            self._ever.add(pod["metadata"]["name"])
                        self._cv.notify_all()
                    if self._closing.is_set():
                        break
            except ApiException as e:
                if e.status == 410:
                    log.info("kubernetes watch expired (410 Gone): listing again")
                else:
                    log.warning("kubernetes watch failed: %s %s", e.status, e.reason)
                    self._closing.wait(1.0)
                rv = None
            except Exception as e:  # noqa: BLE001 - a broken connection: list and watch again
                if not self._closing.is_set():
                    log.warning("kubernetes watch broke (%s: %s); listing again",
                                type(e).__name__, e)
                    self._closing.wait(1.0)
                rv = None

    def _agent(self, node: str) -> dict | None:
        for pod in self._pods.values():
            if component(pod) == "storage-agent" and pod["spec"].get("nodeName") == node \
                    and pod_ready(pod):
                return pod
        return None

    def _store_pod_url(self) -> str | None:
        for pod in self._pods.values():
            if component(pod) == "model-store" and pod_ready(pod):
                return f"http://{pod['status']['podIP']}:8100"
        return None

    # -- what the control plane reads --------------------------------------------------------
    def nodes(self) -> tuple[ServerConfig, ...]:
        return self._servers

    def store_url(self) -> str:
        with self._cv:
            url = self._store_url or self._store_pod_url()
        if url is None:
            raise WorkerError("no ready model store pod", 503)
        return url

    def agent_url(self, node: str) -> str:
        with self._cv:
            pod = self._agent(node)
        if pod is None:
            raise WorkerError(f"node {node} has no ready storage agent pod", 503)
        return f"http://{pod['status']['podIP']}:{self.kcfg.agent_port}"

    def agent_urls(self) -> dict[str, str]:
        out = {}
        for s in self._servers:
            try:
                out[s.name] = self.agent_url(s.name)
            except WorkerError:
                pass
        return out

    def register_model(self, name: str, path: str) -> None:
        """Models live in the store's volume, under their names; the gateway reads the same
        files at ``path`` (its own mount of that volume) for the tokenizer and sizes."""
        log.info("model %s: the store serves it from its volume as %r", name, name)
        self._models[name] = path

    def unregister_model(self, name: str) -> None:
        self._models.pop(name, None)

    def model_size_gb(self, name: str) -> float:
        return model_weights_gb(self._models[name], self.cfg.scale.size_scale)

    def gpu_budgets(self) -> dict[str, list[float]]:
        """The nodes' GPUs as their labels give them (nothing of this backend stays on them)."""
        return {s.name: list(s.gpus) for s in self._servers}

    def warm_pool(self) -> dict[str, dict[str, int]]:
        return {}

    # -- workers -----------------------------------------------------------------------------
    async def start_worker(self, spec: WorkerSpec) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._start_worker, spec)

    def _start_worker(self, spec: WorkerSpec) -> None:
        from kubernetes.client.rest import ApiException

        body = worker_pod(spec, self.kcfg, self.agent_url(spec.node), self.share, self._run,
                          orphan_grace=self.cfg.orphan_grace_s)
        name = body["metadata"]["name"]
        try:
            self.core.create_namespaced_pod(self.ns, body, _request_timeout=30)
        except ApiException as e:
            raise WorkerError(f"creating pod {name}: {e.status} {_message(e)}",
                              500 if e.status >= 500 else 503) from None
        self._workers[spec.worker_id] = name
        log.info("worker %s: pod %s on %s", spec.worker_id, name, spec.node)

    async def wait_worker(self, worker_id: str, timeout: float = 120.0) -> HttpWorker:
        loop = asyncio.get_running_loop()
        ip = await loop.run_in_executor(None, self._wait_ready, worker_id, timeout)
        client = HttpWorker(self._api, f"http://{ip}:{self.kcfg.worker_port}", host=ip)
        await client.health()
        return client

    def _wait_ready(self, worker_id: str, timeout: float) -> str:
        name = self._workers.get(worker_id)
        if name is None:
            raise WorkerError(f"worker {worker_id} was never started", 404)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                pod = self._pods.get(name)
                if pod is not None and pod_ready(pod):
                    return pod["status"]["podIP"]
                if pod is not None and pod_phase(pod) in ("Failed", "Succeeded"):
                    break
                if pod is None and name in self._ever:
                    break  # deleted
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 1.0))
        raise WorkerError(self._why(name, pod, timeout), 503)

    def _why(self, name: str, pod: dict | None, timeout: float) -> str:
        what = pod_problem(name, pod, timeout)
        if pod is None:
            return what
        try:
            tail = self.core.read_namespaced_pod_log(name, self.ns, tail_lines=20,
                                                     _request_timeout=10)
            if tail:
                what += "; its log ends:\n" + tail
        except Exception:  # noqa: BLE001 - the log is a courtesy
            pass
        return what

    def worker_alive(self, worker_id: str) -> bool:
        name = self._workers.get(worker_id)
        if name is None:
            return False
        with self._cv:
            pod = self._pods.get(name)
            if pod is None:  # created, and the watch has not shown it yet: Pending
                return name not in self._ever
        return not pod["metadata"].get("deletionTimestamp") and \
            pod_phase(pod) in ("Pending", "Running")

    async def stop_worker(self, worker_id: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._stop_worker, worker_id)

    def _stop_worker(self, worker_id: str) -> None:
        name = self._workers.pop(worker_id, None)
        if name is not None:
            self._delete(name)
            self._wait_gone(name, self.kcfg.grace_period_s + 10)

    def _delete(self, name: str) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.core.delete_namespaced_pod(name, self.ns,
                                            grace_period_seconds=self.kcfg.grace_period_s,
                                            _request_timeout=30)
        except ApiException as e:
            if e.status != 404:
                log.warning("deleting pod %s: %s %s", name, e.status, _message(e))

    def _wait_gone(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while name in self._pods and time.monotonic() < deadline and \
                    self._thread is not None and self._thread.is_alive():
                self._cv.wait(min(1.0, deadline - time.monotonic()))

    # -- adoption and leases ----------------------------------------------------------------
    async def list_workers(self) -> dict[str, HttpWorker]:
        """A client by worker id for every Ready worker pod of this gateway name, whoever
        created it; the worker pods of others that cannot be adopted
        (`k8s_render.unadoptable`) are deleted (those this backend started itself are left to
        wait_worker and stop_worker)."""
        loop = asyncio.get_running_loop()
        ips = await loop.run_in_executor(None, self._adopt)
        return {wid: HttpWorker(self._api, f"http://{ip}:{self.kcfg.worker_port}", host=ip)
                for wid, ip in ips.items()}

    def _adopt(self) -> dict[str, str]:
        pods = self._raw(self.core.list_namespaced_pod, self.ns, label_selector=(
            f"{COMPONENT}=worker,{GATEWAY}={label_value(self.kcfg.gateway_name)}"))["items"]
        ours = set(self._workers.values())
        ips = {}
        for pod in pods:
            name = pod["metadata"]["name"]
            why = unadoptable(pod)
            spec = pod_spec(pod)
            if why is None and spec is not None and self._workers.get(spec.worker_id, name) != name:
                why = f"worker id {spec.worker_id} is another pod's"
            if why is not None and name in ours:
                continue  # started by this backend, not ready (yet): wait_worker, stop_worker
            if why is not None:
                wid = (pod["metadata"].get("labels") or {}).get(WORKER_ID, "?")
                log.warning("worker pod %s (worker %s) cannot be adopted: %s; deleting it",
                            name, wid, why)
                self._delete(name)
                continue
            assert spec is not None  # unadoptable() checked it
            self._workers[spec.worker_id] = name
            with self._cv:
                if name not in self._ever:  # listed before the watch showed it
                    self._pods[name] = pod
                    self._ever.add(name)
            ips[spec.worker_id] = pod["status"]["podIP"]
            if name not in ours:
                log.info("worker %s: adopted pod %s on %s", spec.worker_id, name,
                         pod["spec"].get("nodeName"))
        return ips

    def renew_lease(self) -> None:
        """Renew the lease of every worker pod this backend knows (started or adopted), at most
        every orphan_grace_s / 4, in a task on the running loop: returns at once."""
        if not self._closing.is_set():
            self._leases.renew(self._lease_urls)

    def _lease_urls(self) -> list[str]:
        with self._cv:
            pods = [self._pods.get(n) for n in list(self._workers.values())]
        return [f"http://{p['status']['podIP']}:{self.kcfg.worker_port}" for p in pods
                if p is not None and (p.get("status") or {}).get("podIP")
                and not p["metadata"].get("deletionTimestamp")]

    # -- the end -----------------------------------------------------------------------------
    async def aclose(self) -> None:
        await self._leases.aclose()
        await self._api.close()

    def detach(self) -> None:
        """Stop the watch and leave every pod running: the gateway that takes over adopts the
        worker pods (`list_workers`) while their leases last."""
        n = len(self._workers)
        self._workers.clear()
        self._stop_watch()
        log.info("kubernetes cluster: detached; %d worker pod(s) left running for the next "
                 "gateway", n)

    def close(self) -> None:
        """Delete the worker pods this backend started or adopted and wait until they are gone
        (a standby's backend knows none: it never deletes the leader's)."""
        names = list(self._workers.values())
        self._workers.clear()
        for name in names:
            self._delete(name)
        for name in names:
            self._wait_gone(name, self.kcfg.grace_period_s + 10)
        self._stop_watch()

    def _stop_watch(self) -> None:
        self._closing.set()
        if self._watch is not None:
            self._watch.stop()


def _message(e) -> str:
    try:
        return json.loads(e.body).get("message", e.reason)
    except (TypeError, ValueError):
        return str(e.reason)


def api_client(kubeconfig: str | None = None):
    """A client for ``kubeconfig`` (a path), else the pod's service account when running in a
    cluster, else the default kubeconfig (~/.kube/config)."""
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()
