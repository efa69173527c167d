"""A fake Kubernetes API server and a local "kubelet", for testing the Kubernetes backend here,
where no real API server can run (no package ships kube-apiserver; kind, k3s and envtest
download binaries or need Docker).

The backend talks to it through the real `kubernetes` client over loopback HTTP. It serves the
subset of the core/v1 (and coordination.k8s.io/v1) REST API the backend, its leader election and
label_nodes.py use, with the API's semantics:

- nodes: list, get, patch (merge and strategic-merge patches of metadata/labels; a patch that
  names a stale ``metadata.resourceVersion`` is a 409 Conflict);
- leases (``coordination.k8s.io/v1``) in a namespace: create (409 AlreadyExists, 422 Invalid
  against the schema), get, list, watch, replace (PUT; a body whose ``metadata.resourceVersion``
  is not the current one is a 409 Conflict, as is a patch's), patch and delete: what leader
  election needs;
- pods in a namespace: create (409 AlreadyExists; 422 Invalid when the pod does not validate
  against the official schema with kubernetes-validate in strict mode), get, list, watch,
  delete (with ``gracePeriodSeconds``: the pod gets ``deletionTimestamp`` and disappears once
  its process exited or was killed after the grace period), and ``pods/{name}/log``;
- list and watch by ``labelSelector`` (equality, ``!=``, existence) and ``fieldSelector``
  (``metadata.name``, ``spec.nodeName``, ``status.phase``), one ``resourceVersion`` counter, a
  watch from a version still in the event window replays what followed it, from an older one
  gets the API's ERROR event with a 410 Expired status; errors carry the API's Status body.

A scheduler step binds a pod to the node named by ``spec.nodeName``, a required node affinity
``matchFields`` on ``metadata.name`` or a ``nodeSelector``; a pod whose node does not exist
stays Pending with the PodScheduled=False/Unschedulable condition.

The kubelet runs each bound pod's single container as a local process: ``$(VAR)`` references
in command and args are expanded from the container's env (plain values and the downward API's
``status.podIP``, ``status.hostIP``, ``spec.nodeName``, ``metadata.name``,
``metadata.namespace``), a command ``hydraserve`` runs this Python's ``-m hydraserve.cli``, and
the output goes to the pod's log. Every pod gets its own loopback address (node i's pods are on
127.(10+i).S.x, S random per fake), so pods bind fixed ports as on a real cluster. A readinessProbe (httpGet or
tcpSocket) is run against the pod's address; phases, container states, exit codes, restart
counts (restartPolicy Always) and the Ready condition are reported in the pod's status.

What it does not model: authentication and RBAC (every request is recorded in ``calls`` as
(verb, resource) so that tests check the backend's calls against the shipped Role instead),
admission beyond schema validation, controllers (Deployments, DaemonSets: tests create the pods
a controller would), Services and DNS, resource accounting of requests and limits (the
GPU claims are recorded, not enforced), images (every container runs this checkout), namespaces
as objects, server-side apply, JSON patches, and watch bookmarks.
"""
from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from aiohttp import web

WINDOW = 1000  # events kept for watches that resume from a resourceVersion


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details or {}, "code": code}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.body = status_body(code, reason, message, details)


def parse_label_selector(sel: str | None):
    """A predicate over label dicts for ``a=b,c!=d,e,!f`` (set-based ``in`` is not modelled)."""
    tests = []
    for term in filter(None, (t.strip() for t in (sel or "").split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            tests.append(lambda ls, k=k, v=v: ls.get(k) != v)
        elif "==" in term or "=" in term:
            k, v = re.split("==?", term, 1)
            tests.append(lambda ls, k=k, v=v: ls.get(k) == v)
        elif term.startswith("!"):
            tests.append(lambda ls, k=term[1:]: k not in ls)
        else:
            tests.append(lambda ls, k=term: k in ls)
    return lambda labels: all(t(labels or {}) for t in tests)


FIELDS = {"metadata.name": lambda o: o["metadata"]["name"],
          "metadata.namespace": lambda o: o["metadata"].get("namespace"),
          "spec.nodeName": lambda o: o.get("spec", {}).get("nodeName"),
          "status.phase": lambda o: o.get("status", {}).get("phase")}


def parse_field_selector(sel: str | None):
    tests = []
    for term in filter(None, (t.strip() for t in (sel or "").split(","))):
        neg = "!=" in term
        k, v = re.split("!=|==?", term, 1)
        if k not in FIELDS:
            raise ApiError(400, "BadRequest", f'field label not supported: "{k}"')
        tests.append(lambda o, k=k, v=v, neg=neg: (FIELDS[k](o) == v) != neg)
    return lambda obj: all(t(obj) for t in tests)


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 merge patch (what strategic merge does for maps, and all label patches are)."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge_patch(target[k], v)
        else:
            target[k] = copy.deepcopy(v)
    return target


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, $$ escapes, unknown stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


class FakeKubernetes:
    """The API server and kubelet on one event loop in a thread; ``url`` once started.

    ``nodes``: {name: {"labels": {...}, "capacity": {...}}}. ``log_dir``: where pod logs go."""

    def __init__(self, nodes: dict[str, dict], log_dir: str | Path, validate: bool = True):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.validate = validate
        self.calls: list[tuple[str, str]] = []  # (verb, resource) of every request
        self.conflicts = 0  # 409 Conflict answers (stale resourceVersions)
        self.rv = itertools.count(1)
        self.version = 0
        self.objects: dict[tuple[str, str | None, str], dict] = {}
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, kind, type, object)
        self.watchers: set[asyncio.Queue] = set()
        self.procs: dict[tuple[str, str], subprocess.Popen] = {}
        self.ips = itertools.count(2)
        self.subnet = secrets.randbelow(256)  # pods of two fakes (or a leftover) never clash
        self.node_index = {name: i for i, name in enumerate(nodes)}
        self.loop = asyncio.new_event_loop()
        self.closing = False
        self._started = threading.Event()
        self.url: str | None = None
        for name, n in nodes.items():
            self._put("nodes", None, {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": dict(n.get("labels", {})),
                             "uid": str(uuid.uuid4()), "creationTimestamp": _now()},
                "spec": {},
                "status": {"capacity": dict(n.get("capacity", {})),
                           "allocatable": dict(n.get("capacity", {})),
                           "addresses": [{"type": "InternalIP", "address": self.host_ip(name)}],
                           "conditions": [{"type": "Ready", "status": "True"}]}}, "ADDED")

    def host_ip(self, node: str) -> str:
        return f"127.{10 + self.node_index[node]}.{self.subnet}.1"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeKubernetes":
        self.thread = threading.Thread(target=self._run, daemon=True, name="fake-kubernetes")
        self.thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the fake API server did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(app, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._tasks: set[asyncio.Task] = set()
        self._started.set()
        self.loop.run_forever()

    def close(self) -> None:
        """Stop the kubelet (no container starts or restarts after this), kill every pod
        process (SIGTERM, then SIGKILL) and stop the server."""
        self.closing = True
        if self.url is not None:
            async def stop_kubelet():
                for t in list(self._tasks):
                    t.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(stop_kubelet(), self.loop).result(15)
        for key, proc in list(self.procs.items()):
            _terminate(proc, 5)
        self.procs.clear()
        if self.url is None:
            return

        async def stop():
            for q in list(self.watchers):
                q.put_nowait(None)
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(15)

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop (tests inspect or change state with it)."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def write_kubeconfig(self, path: str | Path, namespace: str = "hydraserve") -> Path:
        path = Path(path)
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": namespace}}]}))
        return path

    # -- state (on the loop) -----------------------------------------------------------------
    def _put(self, kind: str, ns: str | None, obj: dict, event: str) -> dict:
        rv = next(self.rv)
        self.version = rv
        obj["metadata"]["resourceVersion"] = str(rv)
        key = (kind, ns, obj["metadata"]["name"])
        if event == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        snap = copy.deepcopy(obj)
        self.history.append((rv, kind, event, snap))
        del self.history[:-WINDOW]
        for q in list(self.watchers):
            q.put_nowait((rv, kind, event, snap))
        return obj

    def pods(self) -> list[dict]:
        return [copy.deepcopy(o) for (k, _, _), o in self.objects.items() if k == "pods"]

    def lease(self, ns: str, name: str) -> dict | None:
        o = self.objects.get(("leases", ns, name))
        return copy.deepcopy(o) if o else None

    def pod(self, ns: str, name: str) -> dict | None:
        o = self.objects.get(("pods", ns, name))
        return copy.deepcopy(o) if o else None

    def compact(self) -> None:
        """Forget the event window, as an API server's etcd compaction does: every watch that
        resumes from an earlier resourceVersion gets 410 Gone."""
        self.history.clear()

    # -- HTTP --------------------------------------------------------------------------------
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._route(request)
        except ApiError as e:
            return web.json_response(e.body, status=e.body["code"])
        except (ValueError, KeyError, TypeError) as e:  # a body the fake cannot read
            return web.json_response(status_body(400, "BadRequest", f"{type(e).__name__}: {e}"),
                                     status=400)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        q = request.query
        not_found = ApiError(404, "NotFound", f"the server could not find the requested "
                                              f"resource ({request.method} {request.path})")
        if parts[:2] == ["api", "v1"]:
            rest, kinds = parts[2:], ("nodes", "pods")
        elif parts[:3] == ["apis", "coordination.k8s.io", "v1"]:
            rest, kinds = parts[3:], ("leases",)
        else:
            raise not_found
        ns = None
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        kind, name, sub = (rest + [None, None, None])[:3]
        if kind not in kinds or (kind == "nodes") != (ns is None):
            raise not_found
        if kind == "leases":
            return await self._route_lease(request, ns, name, sub)
        watch = q.get("watch") in ("1", "true")
        verb = {"GET": "watch" if watch else ("get" if name else "list"), "POST": "create",
                "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(request.method, "?")
        self.calls.append((verb, kind + (f"/{sub}" if sub else "")))
        if request.method == "GET" and not name:
            return await self._watch(request, kind, ns) if watch else self._list(kind, ns, q)
        if request.method == "GET" and sub == "log":
            return self._log(ns, name, q)
        if request.method == "GET":
            return web.json_response(self._get(kind, ns, name))
        if request.method == "POST" and kind == "pods" and not name:
            return web.json_response(self._create_pod(ns, await request.json()), status=201)
        if request.method == "PATCH" and kind == "nodes" and name:
            return web.json_response(self._patch(kind, ns, name, await request.json()))
        if request.method == "DELETE" and kind == "pods" and name:
            body = await request.json() if request.can_read_body else {}
            grace = q.get("gracePeriodSeconds", (body or {}).get("gracePeriodSeconds"))
            return web.json_response(self._delete_pod(ns, name, grace))
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported on "
                                                f"{request.path} by this fake")

    async def _route_lease(self, request: web.Request, ns: str, name: str | None,
                           sub: str | None) -> web.StreamResponse:
        q = request.query
        watch = q.get("watch") in ("1", "true")
        verb = {"GET": "watch" if watch else ("get" if name else "list"), "POST": "create",
                "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(request.method, "?")
        self.calls.append((verb, "leases"))
        if sub is None and request.method == "GET" and not name:
            return await self._watch(request, "leases", ns) if watch \
                else self._list("leases", ns, q)
        if sub is None and request.method == "GET":
            return web.json_response(self._get("leases", ns, name))
        if sub is None and request.method == "POST" and not name:
            return web.json_response(self._create_lease(ns, await request.json()), status=201)
        if sub is None and request.method == "PUT" and name:
            return web.json_response(self._replace("leases", ns, name, await request.json()))
        if sub is None and request.method == "PATCH" and name:
            return web.json_response(self._patch("leases", ns, name, await request.json()))
        if sub is None and request.method == "DELETE" and name:
            obj = copy.deepcopy(self._get("leases", ns, name))
            return web.json_response(self._put("leases", ns, obj, "DELETED"))
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported on "
                                                f"{request.path} by this fake")

    def _check_new(self, kind: str, ns: str, obj: dict) -> str:
        """The name of an object to create in ``ns``, after the API's checks (name, namespace,
        the strict schema); 409 when it exists."""
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name):
            raise ApiError(422, "Invalid", f'{obj.get("kind")} "{name}" is invalid: '
                                           "metadata.name: Invalid value: a lowercase RFC 1123 "
                                           "subdomain must consist of lower case alphanumeric "
                                           "characters, '-' or '.'")
        if meta.get("namespace", ns) != ns:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not "
                                              "match the namespace sent on the request")
        self._validate(obj)
        if (kind, ns, name) in self.objects:
            raise ApiError(409, "AlreadyExists", f'{kind} "{name}" already exists',
                           {"name": name, "kind": kind})
        return name

    def _validate(self, obj: dict) -> None:
        if self.validate:
            import kubernetes_validate

            try:
                kubernetes_validate.validate(obj, "1.33", strict=True)
            except kubernetes_validate.ValidationError as e:
                raise ApiError(422, "Invalid", f'{obj.get("kind")} '
                                               f'"{obj["metadata"].get("name")}" is invalid: '
                                               f"{str(e).splitlines()[0]}") from None

    def _create_lease(self, ns: str, lease: dict) -> dict:
        self._check_new("leases", ns, lease)
        lease["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now())
        lease["metadata"].pop("resourceVersion", None)
        return self._put("leases", ns, lease, "ADDED")

    def _replace(self, kind: str, ns: str | None, name: str, obj: dict) -> dict:
        """PUT: the whole object anew; a ``metadata.resourceVersion`` that is not the current
        one is a 409 Conflict (optimistic concurrency), none replaces unconditionally."""
        old = self._get(kind, ns, name)
        meta = obj.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name "
                                              "on the URL")
        want = meta.get("resourceVersion")
        if want and want != old["metadata"]["resourceVersion"]:
            raise self._conflict(kind, name)
        self._validate(obj)
        meta.update(name=name, namespace=ns, uid=old["metadata"]["uid"],
                    creationTimestamp=old["metadata"]["creationTimestamp"])
        return self._put(kind, ns, obj, "MODIFIED")

    def _conflict(self, kind: str, name: str) -> ApiError:
        self.conflicts += 1
        return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind} "{name}": the '
                                         "object has been modified; please apply your changes "
                                         "to the latest version and try again")

    def _get(self, kind: str, ns: str | None, name: str) -> dict:
        obj = self.objects.get((kind, ns, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{kind} "{name}" not found',
                           {"name": name, "kind": kind})
        return obj

    def _select(self, kind: str, ns: str | None, q) -> list[dict]:
        labels = parse_label_selector(q.get("labelSelector"))
        fields = parse_field_selector(q.get("fieldSelector"))
        return [o for (k, n, _), o in sorted(self.objects.items(), key=lambda kv: kv[0][2])
                if k == kind and (ns is None or n == ns)
                and labels(o["metadata"].get("labels")) and fields(o)]

    def _list(self, kind: str, ns: str | None, q) -> web.Response:
        return web.json_response({"apiVersion": "coordination.k8s.io/v1" if kind == "leases"
                                  else "v1",
                                  "kind": {"nodes": "NodeList", "pods": "PodList",
                                           "leases": "LeaseList"}[kind],
                                  "metadata": {"resourceVersion": str(self.version)},
                                  "items": self._select(kind, ns, q)})

    async def _watch(self, request: web.Request, kind: str, ns: str | None) -> web.StreamResponse:
        q = request.query
        labels = parse_label_selector(q.get("labelSelector"))
        fields = parse_field_selector(q.get("fieldSelector"))
        match = lambda o: (o["metadata"].get("namespace") == ns or ns is None) \
            and labels(o["metadata"].get("labels")) and fields(o)  # noqa: E731
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        start = q.get("resourceVersion")
        if start in (None, "", "0"):
            backlog = [(self.version, kind, "ADDED", copy.deepcopy(o))
                       for o in self._select(kind, ns, q)]
        else:
            oldest = self.history[0][0] if self.history else self.version + 1
            if int(start) < oldest - 1:
                err = status_body(410, "Expired", f"too old resource version: {start} "
                                                  f"({oldest - 1})")
                await resp.write((json.dumps({"type": "ERROR", "object": err}) + "\n").encode())
                return resp
            backlog = [h for h in self.history if h[0] > int(start)]
        for item in backlog:
            queue.put_nowait(item)
        self.watchers.add(queue)
        timeout = float(q.get("timeoutSeconds") or 1800)
        try:
            deadline = self.loop.time() + timeout
            while True:
                left = deadline - self.loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    break
                if item is None:
                    break
                _, k, event, obj = item
                if k == kind and match(obj):
                    line = json.dumps({"type": event, "object": obj}) + "\n"
                    await resp.write(line.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.discard(queue)
        return resp

    def _patch(self, kind: str, ns: str | None, name: str, patch: dict) -> dict:
        obj = copy.deepcopy(self._get(kind, ns, name))
        want = (patch.get("metadata") or {}).get("resourceVersion")
        if want is not None and want != obj["metadata"]["resourceVersion"]:
            raise self._conflict(kind, name)
        patch = copy.deepcopy(patch)
        (patch.get("metadata") or {}).pop("resourceVersion", None)
        return self._put(kind, ns, merge_patch(obj, patch), "MODIFIED")

    def _create_pod(self, ns: str, pod: dict) -> dict:
        name = self._check_new("pods", ns, pod)
        meta = pod["metadata"]
        if len(pod["spec"].get("containers", [])) != 1:
            raise ApiError(422, "Invalid", "this fake runs pods of exactly one container")
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now())
        pod["status"] = {"phase": "Pending", "conditions": []}
        node = self._schedule(pod)
        if node is None:
            pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False",
                                            "reason": "Unschedulable",
                                            "message": "0/%d nodes are available: the pod's "
                                                       "node affinity matches no node"
                                                       % len(self.node_index)}]
            return self._put("pods", ns, pod, "ADDED")
        pod["spec"]["nodeName"] = node
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
        self._put("pods", ns, pod, "ADDED")
        self._spawn_task(self._kubelet_run(ns, name))
        return pod

    def _schedule(self, pod: dict) -> str | None:
        spec = pod["spec"]
        if spec.get("nodeName"):
            return spec["nodeName"] if spec["nodeName"] in self.node_index else None
        candidates = list(self.node_index)
        terms = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                 .get("requiredDuringSchedulingIgnoredDuringExecution") or {}) \
            .get("nodeSelectorTerms") or []
        if terms:
            def ok(node: str, term: dict) -> bool:
                labels = self.objects[("nodes", None, node)]["metadata"]["labels"]
                for e in term.get("matchFields") or []:
                    if e["key"] != "metadata.name" or (e["operator"] == "In") != (node in e["values"]):
                        return False
                for e in term.get("matchExpressions") or []:
                    op, k = e["operator"], e["key"]
                    if op == "In" and labels.get(k) not in e.get("values", []):
                        return False
                    if op == "NotIn" and labels.get(k) in e.get("values", []):
                        return False
                    if op == "Exists" and k not in labels:
                        return False
                    if op == "DoesNotExist" and k in labels:
                        return False
                return True
            candidates = [n for n in candidates if any(ok(n, t) for t in terms)]
        sel = spec.get("nodeSelector") or {}
        candidates = [n for n in candidates if all(
            self.objects[("nodes", None, n)]["metadata"]["labels"].get(k) == v
            for k, v in sel.items())]
        return candidates[0] if candidates else None

    def _delete_pod(self, ns: str, name: str, grace) -> dict:
        pod = copy.deepcopy(self._get("pods", ns, name))
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        grace = int(grace)
        proc = self.procs.get((ns, name))
        if proc is None or proc.poll() is not None or grace == 0:
            if proc is not None and proc.poll() is None:
                proc.kill()
            self.procs.pop((ns, name), None)
            return self._put("pods", ns, pod, "DELETED")
        if pod["metadata"].get("deletionTimestamp"):
            return pod
        pod["metadata"]["deletionTimestamp"] = _now()
        pod["metadata"]["deletionGracePeriodSeconds"] = grace
        self._put("pods", ns, pod, "MODIFIED")
        self._spawn_task(self._kubelet_terminate(ns, name, grace))
        return pod

    def _log(self, ns: str, name: str, q) -> web.Response:
        self._get("pods", ns, name)
        path = self.log_dir / f"{ns}_{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        if q.get("tailLines"):
            text = "".join(text.splitlines(True)[-int(q["tailLines"]):])
        return web.Response(text=text, content_type="text/plain")

    # -- the kubelet ---------------------------------------------------------------------------
    def _spawn_task(self, coro) -> None:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _update_status(self, ns: str, name: str, **status) -> dict | None:
        pod = self.objects.get(("pods", ns, name))
        if pod is None:
            return None
        pod = copy.deepcopy(pod)
        pod["status"].update(status)
        return self._put("pods", ns, pod, "MODIFIED")

    def _command(self, pod: dict, ip: str) -> tuple[list[str], dict[str, str]]:
        c = pod["spec"]["containers"][0]
        fields = {"status.podIP": ip, "status.hostIP": self.host_ip(pod["spec"]["nodeName"]),
                  "spec.nodeName": pod["spec"]["nodeName"],
                  "metadata.name": pod["metadata"]["name"],
                  "metadata.namespace": pod["metadata"]["namespace"]}
        env: dict[str, str] = {}
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
            elif ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") in fields:
                env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        argv = [expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]
        if argv[:1] == ["hydraserve"]:
            argv = [sys.executable, "-m", "hydraserve.cli", *argv[1:]]
        return argv, env

    async def _kubelet_run(self, ns: str, name: str) -> None:
        pod = self.objects[("pods", ns, name)]
        node = pod["spec"]["nodeName"]
        ip = f"127.{10 + self.node_index[node]}.{self.subnet}.{next(self.ips)}"
        restarts = 0
        log_path = self.log_dir / f"{ns}_{name}.log"
        while True:
            pod = self.objects.get(("pods", ns, name))
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                return
            argv, env = self._command(pod, ip)
            if self.closing:
                return
            with open(log_path, "a") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env={**os.environ, **env},
                                        start_new_session=True)
            self.procs[(ns, name)] = proc
            cname = pod["spec"]["containers"][0]["name"]
            self._update_status(
                ns, name, phase="Running", podIP=ip, podIPs=[{"ip": ip}],
                hostIP=self.host_ip(node), startTime=_now(),
                conditions=[{"type": "PodScheduled", "status": "True"},
                            {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
                containerStatuses=[{"name": cname, "ready": False, "restartCount": restarts,
                                    "image": pod["spec"]["containers"][0]["image"],
                                    "imageID": "", "started": True,
                                    "state": {"running": {"startedAt": _now()}}}])
            await self._probe_until_ready(ns, name, ip, proc)
            code = await asyncio.get_running_loop().run_in_executor(None, proc.wait)
            pod = self.objects.get(("pods", ns, name))
            if pod is None:
                return
            terminated = {"exitCode": code if code >= 0 else 128 - code,
                          "reason": "Completed" if code == 0 else "Error",
                          "finishedAt": _now()}
            always = pod["spec"].get("restartPolicy", "Always") == "Always"
            if pod["metadata"].get("deletionTimestamp") or not always:
                self._update_status(
                    ns, name, phase="Succeeded" if code == 0 else "Failed",
                    conditions=[{"type": "PodScheduled", "status": "True"},
                                {"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                    containerStatuses=[{"name": cname, "ready": False, "restartCount": restarts,
                                        "image": pod["spec"]["containers"][0]["image"],
                                        "imageID": "", "state": {"terminated": terminated}}])
                if pod["metadata"].get("deletionTimestamp"):
                    self.procs.pop((ns, name), None)
                    self._put("pods", ns, copy.deepcopy(self.objects[("pods", ns, name)]),
                              "DELETED")
                return
            restarts += 1
            await asyncio.sleep(0.2)

    async def _probe_until_ready(self, ns: str, name: str, ip: str, proc) -> None:
        pod = self.objects[("pods", ns, name)]
        c = pod["spec"]["containers"][0]
        probe = c.get("readinessProbe")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        while proc.poll() is None:
            if probe is None:
                ok = True
            elif "httpGet" in probe:
                port = probe["httpGet"]["port"]
                port = ports.get(port, port)
                ok = await _http_ok(ip, int(port), probe["httpGet"].get("path", "/"))
            elif "tcpSocket" in probe:
                port = probe["tcpSocket"]["port"]
                ok = await _tcp_ok(ip, int(ports.get(port, port)))
            else:
                ok = True
            if ok:
                pod = self.objects.get(("pods", ns, name))
                if pod is None or proc.poll() is not None:
                    return
                statuses = copy.deepcopy(pod["status"]["containerStatuses"])
                statuses[0]["ready"] = True
                self._update_status(ns, name, containerStatuses=statuses,
                                    conditions=[{"type": "PodScheduled", "status": "True"},
                                                {"type": "Ready", "status": "True"}])
                return
            await asyncio.sleep(0.2)

    async def _kubelet_terminate(self, ns: str, name: str, grace: int) -> None:
        proc = self.procs.get((ns, name))
        if proc is None:
            return
        await asyncio.get_running_loop().run_in_executor(None, _terminate, proc, grace)

    def kill_pod_process(self, ns: str, name: str, sig: int = signal.SIGKILL) -> None:
        """What a crash (or an OOM kill) does to a pod's container."""
        proc = self.procs.get((ns, name))
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)


def _terminate(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _http_ok(host: str, port: int, path: str) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 2)
        return bool(re.match(rb"HTTP/1\.[01] [23]\d\d", line))
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()


async def _tcp_ok(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


# -- HydraServe on the fake cluster ------------------------------------------------------------
def hydraserve_nodes(cfg) -> dict[str, dict]:
    """Nodes labelled as scripts/kubernetes/label_nodes.py would, from a `ClusterConfig`'s
    servers (GPU memory through the GPU feature discovery label, in MiB)."""
    return {s.name: {"labels": {"hydraserve.io/share": "1" if cfg.share else "0",
                                "hydraserve.io/nic-gbps": str(s.nic_gbps),
                                "hydraserve.io/cache-gb": str(s.cache_gb),
                                "nvidia.com/gpu.memory": str(int(round(s.gpus[0] * 1e9 / 2**20)))},
                     "capacity": {"nvidia.com/gpu": str(len(s.gpus)), "cpu": "2"}}
            for s in cfg.servers}


def service_pods(cfg, store_root: str, namespace: str = "hydraserve") -> list[dict]:
    """The pods that the model store's Deployment and the agents' DaemonSet would create, from
    the shipped manifests' pod templates, with what a test changes: the store's volume is
    ``store_root``, each agent enforces its server's NIC at the cluster's scale (as the local
    backend's agents do), and the agents reach the store by its pod address (the fake has no
    Services: ``$(STORE_URL)`` is set by the caller)."""
    import yaml

    root = Path(__file__).resolve().parents[1] / "scripts" / "kubernetes" / "manifests"
    docs = {}
    for f in ("store.yaml", "agent.yaml"):
        for d in yaml.safe_load_all((root / f).read_text()):
            if d:
                docs[(d["kind"], d["metadata"]["name"])] = d
    scale = cfg.scale.size_scale
    pods = []
    store_tpl = docs[("Deployment", "hydraserve-store")]["spec"]["template"]
    store = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "hydraserve-store-0", "labels": store_tpl["metadata"]["labels"]},
             "spec": copy.deepcopy(store_tpl["spec"])}
    c = store["spec"]["containers"][0]
    c["args"] = [store_root if a == "/models" else a for a in c["args"]]
    if cfg.egress_gbps:
        c["args"] += ["--egress-gbps", str(cfg.egress_gbps / scale)]
    store["spec"]["volumes"] = []
    c.pop("volumeMounts", None)
    pods.append(store)
    agent_tpl = docs[("DaemonSet", "hydraserve-agent")]["spec"]["template"]
    for s in cfg.servers:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"hydraserve-agent-{s.name}",
                            "labels": agent_tpl["metadata"]["labels"]},
               "spec": copy.deepcopy(agent_tpl["spec"])}
        pod["spec"]["nodeName"] = s.name
        c = pod["spec"]["containers"][0]
        c["args"] = [a if not a.startswith("http://hydraserve-store") else "$(STORE_URL)"
                     for a in c["args"]] + ["--nic-gbps", str(s.nic_gbps / scale)]
        c["env"] = [e for e in c.get("env", []) if e["name"] != "CACHE_GB"] + [
            {"name": "CACHE_GB", "value": str(s.cache_gb / scale)}]
        pods.append(pod)
    return pods


def start_hydraserve(fake: FakeKubernetes, cfg, store_root: str,
                     namespace: str = "hydraserve", timeout: float = 60.0) -> str:
    """Create the store pod, wait until it is ready, then one agent pod per server pointed at
    it; returns the store's URL."""
    import time

    pods = service_pods(cfg, store_root, namespace)
    store, agents = pods[0], pods[1:]
    fake.call(fake._create_pod, namespace, store)
    deadline = time.monotonic() + timeout
    while True:
        pod = fake.call(fake.pod, namespace, store["metadata"]["name"])
        if any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod["status"].get("conditions", [])):
            break
        if time.monotonic() > deadline or pod["status"]["phase"] == "Failed":
            raise RuntimeError("the store pod did not start:\n" + (
                fake.log_dir / f"{namespace}_{store['metadata']['name']}.log").read_text())
        time.sleep(0.1)
    url = f"http://{pod['status']['podIP']}:8100"
    for a in agents:
        a["spec"]["containers"][0]["env"].append({"name": "STORE_URL", "value": url})
        fake.call(fake._create_pod, namespace, a)
    return url


def main() -> int:
    """Run a fake cluster until interrupted, e.g. to try `hydraserve serve --cluster-backend
    kubernetes`, the experiment scripts with CLUSTER_BACKEND=kubernetes, or the opt-in real-
    cluster tests against it:  python tests/kubefake.py --volume DIR --kubeconfig KC"""
    import argparse
    import tempfile
    import time

    from hydraserve.config import ClusterConfig, ScaleConfig, ServerConfig, load_cluster

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--volume", required=True, help="the store's volume: one folder per model")
    ap.add_argument("--kubeconfig", required=True, help="write the kubeconfig here")
    ap.add_argument("--cluster", help="a local cluster YAML whose servers become the nodes "
                                      "(default: 2 servers, one 24 GB GPU, 16 Gbps, 1/100)")
    args = ap.parse_args()
    _interrupt_on_sigterm()  # stopped with SIGTERM too, it ends every pod it started
    cfg = load_cluster(args.cluster) if args.cluster else ClusterConfig(
        servers=tuple(ServerConfig(f"n{i}", (24.0,), 16.0) for i in range(2)),
        scale=ScaleConfig(size_scale=100.0))
    fake = FakeKubernetes(hydraserve_nodes(cfg), tempfile.mkdtemp(prefix="kubefake-")).start()
    try:
        start_hydraserve(fake, cfg, str(Path(args.volume).resolve()))
        fake.write_kubeconfig(args.kubeconfig)
        print(f"fake cluster on {fake.url}; kubeconfig {args.kubeconfig}; pod logs in "
              f"{fake.log_dir}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.close()
    return 0


def _interrupt_on_sigterm() -> None:
    def handler(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
