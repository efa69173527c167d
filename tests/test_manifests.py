"""The Kubernetes deployment files, checked without a cluster: every manifest against the
Kubernetes API schemas (strict: unknown fields are errors), the RBAC rules against the exact set
the gateway needs, the containers' command lines against the real `hydraserve` parser, the
config against hydraserve.config, the Dockerfiles for the basics, and the control-plane import
paths for being torch-free (the control image has no torch)."""
from __future__ import annotations

import dataclasses

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hydraserve.cli import build_parser
from hydraserve.cluster.base import WorkerSpec, worker_args
from hydraserve.cluster.k8s_render import TOKEN_ENV, worker_pod
from hydraserve.config import ClusterConfig, KubernetesConfig
from hydraserve.config import cluster_from_dict, models_from_dict

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "scripts" / "kubernetes"
MANIFESTS = K8S / "manifests"
WORKER_POD = K8S / "examples" / "worker-pod.yaml"
DOCKER = K8S / "docker"

K8S_VERSION = "1.35.0"  # the schemas every document is validated against
NAMESPACE = "hydraserve"
PART_OF = {"app.kubernetes.io/part-of": "hydraserve"}
COMPONENT = "app.kubernetes.io/component"
STORE_PORT, AGENT_PORT, GATEWAY_PORT, WORKER_PORT, STAGE_PORT = 8100, 8101, 8000, 8200, 8201
STORE_URL = f"http://hydraserve-store:{STORE_PORT}"
UID = 10001  # the agent's shared-memory regions are owner-only: agent and workers share it
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
MANIFEST_FILES = ["namespace.yaml", "rbac.yaml", "configmap.yaml", "store.yaml", "agent.yaml",
                  "gateway.yaml"]
K8S_KEYS = {"namespace": "hydraserve", "gateway_name": "hydraserve",
            "worker_image": "hydraserve-worker:cuda", "vllm_image": "hydraserve-worker:vllm",
            "gpu_resource": "nvidia.com/gpu", "share_resource": "aliyun.com/gpu-mem",
            "share_unit_gb": 1, "store_url": STORE_URL, "grace_period_s": 10}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[tuple[str, dict]]:
    out = [(f"{f}#{i}", d) for f in MANIFEST_FILES for i, d in enumerate(_docs(MANIFESTS / f))]
    return out + [(f"{WORKER_POD.name}#{i}", d) for i, d in enumerate(_docs(WORKER_POD))]


DOCS = _all_docs()


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _pod_spec(d: dict) -> dict:
    return d["spec"] if d["kind"] == "Pod" else d["spec"]["template"]["spec"]


def _container(d: dict) -> dict:
    (c,) = _pod_spec(d)["containers"]
    return c


def _ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def _expand(c: dict) -> list[str]:
    """The container's args with $(VAR) replaced as the kubelet would (fieldRefs by examples)."""
    examples = {"status.podIP": "10.244.1.7", "spec.nodeName": "gpu-node-1"}
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in (e.get("valueFrom") or {}):
            env[e["name"]] = examples[e["valueFrom"]["fieldRef"]["fieldPath"]]
    out = []
    for a in c["args"]:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
            assert var in env, f"{c['name']}: $({var}) is not an env var of the container"
            a = a.replace(f"$({var})", env[var])
        out.append(a)
    return out


def _parse(c: dict):
    assert c["command"] == ["hydraserve"]
    return build_parser().parse_args(_expand(c))


# --- (a) schemas -------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization"
    assert k["resources"] == MANIFEST_FILES
    assert sorted(p.name for p in MANIFESTS.glob("*.yaml")) == sorted(
        MANIFEST_FILES + ["kustomization.yaml"])


@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_schema_strict(where, doc):
    kv = pytest.importorskip("kubernetes_validate")
    assert kv.validate(doc, K8S_VERSION, strict=True) == "1.35"


def test_strict_validation_rejects_unknown_fields():
    kv = pytest.importorskip("kubernetes_validate")
    pod = json.loads(json.dumps(_one("Pod", "hs-llama-2-7b-3-r0-5f3a9c")))
    _container(pod)["hostIPC"] = True  # a pod field, misplaced in the container
    with pytest.raises(kv.ValidationError):
        kv.validate(pod, K8S_VERSION, strict=True)


def test_namespaces_and_labels():
    for where, d in DOCS:
        md = d["metadata"]
        if d["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in md, where
        else:
            assert md["namespace"] == NAMESPACE, where
        assert PART_OF.items() <= md["labels"].items(), where
    # host IPC/PID and hostPath (agent, workers) are beyond the Pod Security baseline level
    ns_labels = _one("Namespace", NAMESPACE)["metadata"]["labels"]
    assert ns_labels["pod-security.kubernetes.io/enforce"] == "privileged"
    components = {"hydraserve-store": "model-store", "hydraserve-agent": "storage-agent",
                  "hydraserve-gateway": "gateway"}
    for kind, name in [("Deployment", "hydraserve-store"), ("DaemonSet", "hydraserve-agent"),
                       ("Deployment", "hydraserve-gateway")]:
        d = _one(kind, name)
        want = {**PART_OF, COMPONENT: components[name]}
        assert d["metadata"]["labels"] == want
        assert d["spec"]["selector"]["matchLabels"] == want
        assert want.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        if kind == "Deployment":  # the gateway: a leader and a standby (a Lease decides)
            assert d["spec"]["replicas"] == (2 if name == "hydraserve-gateway" else 1)
        for vol in _pod_spec(d).get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"] == {"claimName": "hydraserve-models",
                                                        "readOnly": True}


def test_services_select_their_pods():
    for name, port in [("hydraserve-store", STORE_PORT), ("hydraserve-gateway", GATEWAY_PORT)]:
        svc, dep = _one("Service", name), _one("Deployment", name)
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        (p,) = svc["spec"]["ports"]
        assert (p["name"], p["port"], p["targetPort"]) == ("http", port, "http")
        assert _ports(_container(dep)) == {"http": port}


# --- (b) RBAC: exactly what the gateway needs ---------------------------------------------------

def _rules(d: dict) -> set[tuple[str, str, str]]:
    out = set()
    for r in d["rules"]:
        assert set(r) == {"apiGroups", "resources", "verbs"}, r  # no resourceNames, no URLs
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    out.add((g, res, v))
    return out


def test_rbac_is_exact():
    role, crole = _one("Role", "hydraserve-gateway"), _one("ClusterRole", "hydraserve-nodes")
    assert _rules(role) == {("", "pods", v) for v in ("create", "get", "list", "watch",
                                                     "delete")} | {("", "pods/log", "get")} | {
        ("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    assert _rules(crole) == {("", "nodes", v) for v in ("get", "list", "patch")}
    rbac = [d for _, d in DOCS if d["apiVersion"].startswith("rbac.")]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rbac) == [
        ("ClusterRole", "hydraserve-nodes"), ("ClusterRoleBinding", "hydraserve-nodes"),
        ("Role", "hydraserve-gateway"), ("RoleBinding", "hydraserve-gateway")]
    sa = {"kind": "ServiceAccount", "name": "hydraserve-gateway", "namespace": NAMESPACE}
    for kind, role_kind, name in [("RoleBinding", "Role", "hydraserve-gateway"),
                                  ("ClusterRoleBinding", "ClusterRole", "hydraserve-nodes")]:
        b = _one(kind, name)
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                "name": name}
        assert b["subjects"] == [sa]
    assert _one("ServiceAccount", "hydraserve-gateway")
    assert "*" not in json.dumps([role["rules"], crole["rules"]])
    gw = _pod_spec(_one("Deployment", "hydraserve-gateway"))
    assert gw["serviceAccountName"] == "hydraserve-gateway"
    # the other pods never talk to the API server
    for kind, name in [("Deployment", "hydraserve-store"), ("DaemonSet", "hydraserve-agent"),
                       ("Pod", "hs-llama-2-7b-3-r0-5f3a9c")]:
        assert _pod_spec(_one(kind, name))["automountServiceAccountToken"] is False


# --- (c) consistency with the code ---------------------------------------------------------------

def test_store_args_parse():
    d = _one("Deployment", "hydraserve-store")
    c = _container(d)
    args = _parse(c)
    assert (args.command, args.store_command) == ("store", "serve")
    assert (args.host, args.port) == ("10.244.1.7", STORE_PORT)
    assert c["image"] == "hydraserve-control:latest"
    assert {m["mountPath"]: m.get("readOnly") for m in c["volumeMounts"]} == {args.root: True}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_agent_args_parse():
    d = _one("DaemonSet", "hydraserve-agent")
    spec, c = _pod_spec(d), _container(d)
    args = _parse(c)
    assert (args.command, args.store_command) == ("store", "agent")
    assert (args.node, args.remote, args.host, args.port) == (
        "gpu-node-1", STORE_URL, "10.244.1.7", AGENT_PORT)
    assert args.cache_gb == 0.0
    assert _ports(c) == {"http": AGENT_PORT}
    assert c["image"] == "hydraserve-control:latest"
    assert spec["hostIPC"] is True and spec["hostPID"] is True
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "hydraserve.io/share", "operator": "Exists"}]}]}
    _check_dev_shm(spec, c)
    assert spec["securityContext"]["runAsUser"] == UID


def _check_dev_shm(spec: dict, c: dict) -> None:
    (vol,) = [v for v in spec["volumes"] if "hostPath" in v]
    assert vol["hostPath"] == {"path": "/dev/shm", "type": "Directory"}
    assert {"name": vol["name"], "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_gateway_args_parse_and_config_mounts():
    d = _one("Deployment", "hydraserve-gateway")
    spec, c = _pod_spec(d), _container(d)
    args = _parse(c)
    assert (args.command, args.cluster_backend, args.host, args.port) == (
        "serve", "kubernetes", "0.0.0.0", GATEWAY_PORT)
    assert c["image"] == "hydraserve-control:latest"
    assert c["env"] == [{"name": "HYDRASERVE_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "hydraserve-admin", "key": "token", "optional": True}}}, TOKEN_ENV]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    cm = _one("ConfigMap", "hydraserve-config")
    (cfg_vol,) = [n for n, v in vols.items() if v.get("configMap") == {"name": "hydraserve-config"}]
    cfg_dir = Path(mounts[cfg_vol]["mountPath"])
    assert {Path(args.cluster), Path(args.models)} == {cfg_dir / k for k in cm["data"]}
    (pvc_vol,) = [n for n, v in vols.items() if "persistentVolumeClaim" in v]
    assert mounts[pvc_vol]["mountPath"] == "/models" and mounts[pvc_vol]["readOnly"] is True


def test_configmap_loads_with_hydraserve_config():
    data = _one("ConfigMap", "hydraserve-config")["data"]
    cluster = yaml.safe_load(data["cluster.yaml"])
    assert "servers" not in cluster  # discovered from the labelled nodes
    assert cluster["kubernetes"] == K8S_KEYS
    # what the backend builds: this file plus the servers it discovers
    cfg = cluster_from_dict({**cluster, "servers": [
        {"name": "gpu-node-1", "gpus": [24, 24], "nic_gbps": 16, "cache_gb": 0}]})
    assert (cfg.device, cfg.share, cfg.egress_gbps) == ("cuda", True, None)
    assert cfg.scale.size_scale == 1.0
    models = models_from_dict(yaml.safe_load(data["models.yaml"]))
    assert models and all(m.path == f"/models/{m.name}" for m in models)


def test_example_worker_pod_is_what_the_backend_starts():
    pod = _one("Pod", "hs-llama-2-7b-3-r0-5f3a9c")
    spec_ = WorkerSpec(worker_id="llama-2-7b-3-r0", model="llama-2-7b", node="gpu-node-1",
                       rank=0, p=2, layers=(0, 16), all_card=True, num_kv_blocks=1024,
                       instance="llama-2-7b-3", gpu=0, claim_gb=19.0,
                       device="cuda", dtype="float16", gpu_memory_gb=19.0)
    agent = f"http://10.244.1.7:{AGENT_PORT}"
    kcfg = KubernetesConfig(**{k: v for k, v in K8S_KEYS.items()
                               if k in {f.name for f in dataclasses.fields(KubernetesConfig)}})
    grace = ClusterConfig(servers=()).orphan_grace_s  # the default the backend passes
    built = worker_pod(spec_, kcfg, agent, True, run="5f3a9c", orphan_grace=grace)
    assert pod == {**built, "metadata": {**built["metadata"], "namespace": NAMESPACE}}
    spec, c = pod["spec"], _container(pod)
    _check_dev_shm(spec, c)
    assert spec["securityContext"]["runAsUser"] == UID
    assert (c["name"], c["image"]) == ("worker", K8S_KEYS["worker_image"])
    assert _ports(c) == {"http": WORKER_PORT, "stage": STAGE_PORT}
    assert c["resources"]["limits"] == {K8S_KEYS["share_resource"]: "19"}
    assert c["args"] == worker_args(spec_, agent) + [
        "--host", "$(POD_IP)", "--port", str(WORKER_PORT), "--stage-port", str(STAGE_PORT),
        "--orphan-grace", f"{grace:g}"]
    assert WorkerSpec.from_json(json.loads(pod["metadata"]["annotations"]["hydraserve.io/spec"])) \
        == spec_
    args = _parse(c)
    assert (args.command, args.model, args.rank, args.p, args.agent, args.port,
            args.stage_port) == ("worker", "llama-2-7b", 0, 2, agent, WORKER_PORT, STAGE_PORT)


def test_images_are_built_by_the_dockerfiles():
    built = {}
    for f in DOCKER.glob("*.Dockerfile"):
        (tag,) = re.findall(r"docker build -f scripts/kubernetes/docker/" + re.escape(f.name)
                            + r" -t (\S+) \.", f.read_text())
        built[tag] = f.name
    assert set(built) == {"hydraserve-control:latest", "hydraserve-worker:cuda",
                          "hydraserve-worker:cpu", "hydraserve-worker:vllm"}
    used = {_container(d)["image"] for _, d in DOCS if d["kind"] in ("Deployment", "DaemonSet",
                                                                     "Pod")}
    used |= {K8S_KEYS["worker_image"], K8S_KEYS["vllm_image"]}
    assert used <= set(built)


# --- (d) Dockerfiles and the torch-free control plane --------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in path.read_text().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        op, _, rest = cur.strip().partition(" ")
        out.append((op.upper(), rest.strip()))
        cur = ""
    assert not cur, f"{path.name}: dangling continuation"
    return out


def _setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords
          if k.arg in ("install_requires", "extras_require")}
    return kw["install_requires"], kw["extras_require"]


def _torch_free_requirements() -> set[str]:
    reqs, _ = _setup_requirements()
    return {r for r in reqs if not re.match(r"torch\b", r)}


DOCKERFILES = ["control.Dockerfile", "worker.Dockerfile", "worker-cpu.Dockerfile",
               "worker-vllm.Dockerfile"]


def test_dockerfile_set():
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(DOCKERFILES)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_basics(name):
    ins = _instructions(DOCKER / name)
    args = {}
    for op, rest in ins:
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) == 1, froms
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0].split()[0])
    repo, sep, tag = image.rpartition(":")
    assert sep and "/" not in tag and tag and tag != "latest", image
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] == str(UID)
    last_user = max(i for i, (op, _) in enumerate(ins) if op == "USER")
    assert all(op not in ("RUN", "COPY", "ADD") for op, _ in ins[last_user:])
    (entry,) = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert json.loads(entry) == ["hydraserve"]
    assert ("COPY", "hydraserve ./hydraserve") in ins
    assert ("COPY", "setup.py README.md ./") in ins  # setup.py reads README.md
    run = " ".join(rest for op, rest in ins if op == "RUN")
    assert f"--uid {UID}" in run
    if name in ("control.Dockerfile", "worker-vllm.Dockerfile"):
        assert "pip install --no-deps ." in run  # no torch (control) or vLLM's own (vllm)
    else:
        assert '"torch==${TORCH_VERSION}"' in run


def test_dockerfile_requirements_follow_setup_py():
    _, extras = _setup_requirements()
    quoted = lambda name: set(re.findall(r'"([A-Za-z0-9_.-]+[<>=!~][^"]*)"',  # noqa: E731
                                         (DOCKER / name).read_text()))
    assert quoted("control.Dockerfile") == _torch_free_requirements() | set(extras["kubernetes"])
    assert quoted("worker-vllm.Dockerfile") == _torch_free_requirements()
    torch = re.search(r"TORCH \?= (torch==\S+)", (ROOT / "Makefile").read_text()).group(1)
    for name in ("worker.Dockerfile", "worker-cpu.Dockerfile"):
        ins = _instructions(DOCKER / name)
        assert ("ARG", "TORCH_VERSION=" + torch.split("==")[1]) in ins, name
    assert "download.pytorch.org/whl/cpu" in (DOCKER / "worker-cpu.Dockerfile").read_text()
    assert {"kubernetes>=29", "kubernetes-validate>=1.35"} <= set(extras["test"])
    assert extras["kubernetes"] == ["kubernetes>=29"]


def test_control_plane_imports_no_torch():
    code = ("import sys, hydraserve.cli as cli; cli.build_parser(); "
            "import hydraserve.store.agent, hydraserve.store.remote, hydraserve.store.server, "
            "hydraserve.gateway.app, hydraserve.control.controller, hydraserve.config; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
