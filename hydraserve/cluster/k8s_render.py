"""What the Kubernetes backend sends and reads, as plain dicts: the worker pod it creates for a
`WorkerSpec`, the servers it reads from labelled nodes, what a pod's status says, and whether a
worker pod an earlier gateway left can be adopted. No API
calls and no threads here (hydraserve.cluster.kubernetes makes those), so every rule about
names, labels and claims is testable on its own and the manifests' example is written from it.

The labels scripts/kubernetes/label_nodes.py sets on a node:

    hydraserve.io/share      "1": GPUs shared by memory, "0": exclusive (a node is a server iff
                             it carries this label)
    hydraserve.io/nic-gbps   its NIC bandwidth (default: KubernetesConfig.default_nic_gbps)
    hydraserve.io/cache-gb   its host-memory model cache
    GPUs: capacity nvidia.com/gpu and NVIDIA feature discovery's nvidia.com/gpu.memory (MiB),
    or hydraserve.io/gpus and hydraserve.io/gpu-memory-gb where feature discovery is absent.

A worker pod is its own record (the cluster is the record: a gateway that starts adopts what
runs): the annotation hydraserve.io/spec holds its `WorkerSpec` as JSON, and labels name its
gateway, worker id, instance, model and rank, for selectors and for people.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

from hydraserve.config import ConfigError, KubernetesConfig, ServerConfig
from hydraserve.protocol import ProtocolError, WorkerSpec, worker_args

PART_OF = "app.kubernetes.io/part-of"
COMPONENT = "app.kubernetes.io/component"
GATEWAY = "hydraserve.io/gateway"
WORKER_ID = "hydraserve.io/worker-id"
INSTANCE = "hydraserve.io/instance"
MODEL = "hydraserve.io/model"
RANK = "hydraserve.io/rank"
NODE_SHARE = "hydraserve.io/share"
NODE_NIC = "hydraserve.io/nic-gbps"
NODE_CACHE = "hydraserve.io/cache-gb"
NODE_GPUS = "hydraserve.io/gpus"
NODE_GPU_MEMORY = "hydraserve.io/gpu-memory-gb"
GFD_GPU_MEMORY = "nvidia.com/gpu.memory"  # MiB per GPU (NVIDIA GPU feature discovery)
GPU_CAPACITY = "nvidia.com/gpu"
SPEC = "hydraserve.io/spec"  # annotation: the worker's WorkerSpec as JSON

# the optional cluster token (hydraserve.cli.CLUSTER_TOKEN_ENV) from the Secret the manifests name
TOKEN_ENV = {"name": "HYDRASERVE_CLUSTER_TOKEN", "valueFrom": {"secretKeyRef": {
    "name": "hydraserve-cluster-token", "key": "token", "optional": True}}}


def label_value(s: str) -> str:
    """``s`` as a label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    v = re.sub(r"[^A-Za-z0-9._-]", "-", s)[:63].strip("._-")
    return v or "x"


def pod_name(worker_id: str, run: str) -> str:
    """The pod of a worker: ``hs-<id>-<run>`` as a DNS label (at most 63 characters); ``run``
    tells one gateway's workers from an earlier one's, whose pods may still be terminating."""
    v = re.sub(r"[^a-z0-9-]", "-", worker_id.lower())[:63 - 4 - len(run)].strip("-")
    return f"hs-{v}-{run}"


def servers_from_nodes(nodes: list[dict], kcfg: KubernetesConfig) -> tuple[
        tuple[ServerConfig, ...], bool | None]:
    """The servers of a cluster (nodes carrying the share label) and its sharing mode (None
    where no node is labelled); a node whose GPUs cannot be read is an error naming it."""
    servers, modes = [], set()
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        name = node["metadata"]["name"]
        labels = node["metadata"].get("labels") or {}
        if NODE_SHARE not in labels:
            continue
        modes.add(labels[NODE_SHARE] == "1")
        capacity = (node.get("status") or {}).get("capacity") or {}
        try:
            count = int(labels.get(NODE_GPUS) or capacity.get(GPU_CAPACITY) or 0)
            if NODE_GPU_MEMORY in labels:
                memory = float(labels[NODE_GPU_MEMORY])
            elif GFD_GPU_MEMORY in labels:
                memory = float(labels[GFD_GPU_MEMORY]) * 2**20 / 1e9
            else:
                memory = 0.0
            nic = float(labels.get(NODE_NIC, kcfg.default_nic_gbps))
            cache = float(labels.get(NODE_CACHE, 0.0))
        except ValueError as e:
            raise ConfigError(f"node {name}: a hydraserve label is not a number ({e})") from None
        if count <= 0 or memory <= 0:
            raise ConfigError(
                f"node {name} is labelled {NODE_SHARE} but its GPUs are unknown: it needs "
                f"capacity {GPU_CAPACITY} (or label {NODE_GPUS}) and label {GFD_GPU_MEMORY} "
                f"(or {NODE_GPU_MEMORY}); see scripts/kubernetes/label_nodes.py")
        servers.append(ServerConfig(name=name, gpus=(memory,) * count, nic_gbps=nic,
                                    cache_gb=cache))
    if len(modes) > 1:
        raise ConfigError(f"nodes disagree on {NODE_SHARE} (some 0, some 1): label them all "
                          "for one experiment (SHARE=0|1 scripts/kubernetes/label_nodes.py)")
    return tuple(servers), (modes.pop() if modes else None)


def worker_pod(spec: WorkerSpec, kcfg: KubernetesConfig, agent_url: str, share: bool,
               run: str = "0", orphan_grace: float | None = None) -> dict:
    """The pod that runs ``spec``: the local backend's worker command, bound to the pod's IP,
    pinned to ``spec.node``, claiming its GPU share, carrying the spec it runs (`pod_spec`
    reads it back). With ``orphan_grace`` the worker holds an in-memory lease
    (`hydraserve.lease`): it exits by itself once its gateway has not called its ``POST
    /lease`` for that many seconds."""
    if spec.engine == "vllm":  # the image's own Python has vLLM
        spec = dataclasses.replace(spec, vllm_python=None)
    args = worker_args(spec, agent_url)
    args += ["--host", "$(POD_IP)", "--port", str(kcfg.worker_port),
             "--stage-port", str(kcfg.stage_port)]
    if orphan_grace is not None:
        args += ["--orphan-grace", f"{orphan_grace:g}"]
    limits: dict[str, str] = {}
    if share and kcfg.share_resource:
        gb = spec.gpu_memory_gb or kcfg.share_unit_gb
        limits[kcfg.share_resource] = str(max(1, math.ceil(gb / kcfg.share_unit_gb - 1e-9)))
    elif not share and kcfg.gpu_resource:
        limits[kcfg.gpu_resource] = "1"
    container = {
        "name": "worker",
        "image": kcfg.vllm_image if spec.engine == "vllm" else kcfg.worker_image,
        "imagePullPolicy": kcfg.image_pull_policy,
        "command": ["hydraserve"],
        "args": args,
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                TOKEN_ENV],
        "ports": [{"name": "http", "containerPort": kcfg.worker_port},
                  {"name": "stage", "containerPort": kcfg.stage_port}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"},
                           "periodSeconds": 1, "failureThreshold": 3},
        "volumeMounts": [{"name": "dev-shm", "mountPath": "/dev/shm"}],
    }
    if limits:
        container["resources"] = {"limits": limits}
    labels = {PART_OF: "hydraserve", COMPONENT: "worker", GATEWAY: label_value(kcfg.gateway_name),
              WORKER_ID: label_value(spec.worker_id), MODEL: label_value(spec.model),
              RANK: str(spec.rank)}
    if spec.instance:
        labels[INSTANCE] = label_value(spec.instance)
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name(spec.worker_id, run), "labels": labels,
                     "annotations": {SPEC: json.dumps(spec.to_json(), sort_keys=True)}},
        "spec": {
            "restartPolicy": "Never",
            "hostIPC": True,
            "hostPID": True,
            "automountServiceAccountToken": False,
            # the agent's user: a shared-memory region is readable by its owner only
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001},
            "terminationGracePeriodSeconds": kcfg.grace_period_s,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [spec.node]}]}]}}},
            # GPU nodes are often tainted for GPU workloads only
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}],
            "containers": [container],
            "volumes": [{"name": "dev-shm", "hostPath": {"path": "/dev/shm",
                                                         "type": "Directory"}}],
        },
    }


def pod_ready(pod: dict) -> bool:
    """Whether ``pod`` is Ready, has an address and is not being deleted."""
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds) \
        and bool(pod["status"].get("podIP")) and not pod["metadata"].get("deletionTimestamp")


def pod_phase(pod: dict) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def pod_spec(pod: dict) -> WorkerSpec | None:
    """The `WorkerSpec` a worker pod carries (None: no annotation, or one that does not read)."""
    raw = (pod["metadata"].get("annotations") or {}).get(SPEC)
    if not raw:
        return None
    try:
        return WorkerSpec.from_json(json.loads(raw))
    except (ProtocolError, ValueError, TypeError, KeyError, AttributeError):
        return None


def unadoptable(pod: dict) -> str | None:
    """Why a gateway that starts cannot adopt this worker pod (None: it can). It adopts a pod
    that is Ready (its worker's /health answers) at an address, not being deleted, and carries
    a readable spec; anything else (still Pending or not yet Ready, ended, being deleted, an
    unreadable spec) it deletes: a half-started worker's instance is rebuilt by a cold start."""
    if pod["metadata"].get("deletionTimestamp"):
        return "it is being deleted"
    if pod_phase(pod) in ("Failed", "Succeeded"):
        return f"it is {pod_phase(pod)}"
    if pod_spec(pod) is None:
        return f"its {SPEC} annotation is missing or unreadable"
    if not pod_ready(pod):
        return f"it is {pod_phase(pod)} and not Ready"
    return None


def component(pod: dict) -> str | None:
    """The HydraServe component a pod runs ("worker", "storage-agent", "model-store")."""
    return (pod["metadata"].get("labels") or {}).get(COMPONENT)


def pod_problem(name: str, pod: dict | None, timeout: float) -> str:
    """Why the pod ``name`` (None: deleted) is not serving, from its status alone: the phase,
    the failed conditions and the container's exit code."""
    if pod is None:
        return f"pod {name} was deleted before it was ready"
    status = pod.get("status") or {}
    what = f"pod {name} is {pod_phase(pod)}"
    for c in status.get("conditions") or []:
        if c.get("status") == "False" and c.get("message"):
            what += f" ({c['type']}: {c.get('reason')}: {c['message']})"
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            what += f", its container exited with code {term.get('exitCode')}"
    if pod_phase(pod) not in ("Failed", "Succeeded"):
        what += f", not ready after {timeout:.0f} s"
    return what
