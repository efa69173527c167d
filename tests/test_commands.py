"""The command line's plumbing: the environment read once and passed down, the backend factory,
the worker's flags as a WorkerSpec, the warm runtime's assignment, the explicit token of the
blocking HTTP calls, and the pruning of old run log folders."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hydraserve.cli import build_parser, read_environment
from hydraserve.cluster.factory import BackendKind, build_backend, default_cluster
from hydraserve.config import ClusterConfig, ScaleConfig, ServerConfig
from hydraserve.gateway.commands import prune_run_logs
from hydraserve.httpjson import call, get_bytes, stream
from hydraserve.protocol import (RUNTIME_READY, ProtocolError, RuntimeAssignment, WorkerSpec,
                                 worker_args)
from hydraserve.worker.commands import spec_from_args

SPEC = WorkerSpec(worker_id="m-r1", model="m", node="n0", rank=1, p=2, layers=(2, 4),
                  all_card=True, num_kv_blocks=64, dtype="float16", max_num_seqs=8,
                  threads=2, late_attach=True, streaming_load=False, gpu_memory_gb=3.5)


def test_options_take_their_variable_only_when_not_given():
    env = {"HYDRASERVE_CLUSTER_TOKEN": "t", "HYDRASERVE_ADMIN_TOKEN": "a",
           "KUBECONFIG": "/k", "HYDRASERVE_VLLM_PYTHON": "/py", "HYDRASERVE_CACHE": "/c"}
    parser = build_parser()
    args = read_environment(parser.parse_args(["serve", "--kubeconfig", "/given"]), env)
    assert (args.cluster_token, args.admin_token, args.kubeconfig, args.vllm_python) == \
        ("t", "a", "/given", "/py")
    assert str(args.cache_root) == "/c"
    worker = read_environment(parser.parse_args(worker_args(SPEC, "http://a")), env)
    assert worker.vllm_python == "/py" and not hasattr(worker, "admin_token")
    bare = read_environment(parser.parse_args(["serve"]), {})
    assert bare.cluster_token is None and bare.admin_token is None and bare.kubeconfig is None


def test_backend_kinds_are_the_serve_choices():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    (action,) = [a for a in serve._actions if a.dest == "cluster_backend"]
    assert action.choices == [k.value for k in BackendKind] == ["local", "kubernetes"]
    assert BackendKind("kubernetes") is BackendKind.KUBERNETES
    k8s = default_cluster(BackendKind.KUBERNETES)
    assert k8s.servers == () and k8s.device == "cuda" and k8s.kubernetes is not None
    assert len(default_cluster(BackendKind.LOCAL).servers) == 4


def test_build_backend_local_is_not_started(tmp_path):
    from hydraserve.cluster.local import LocalCluster

    cfg = ClusterConfig(servers=(ServerConfig("n0", (24.0,), 16.0),),
                        scale=ScaleConfig(size_scale=100.0))
    backend = build_backend("local", cfg, log_dir=str(tmp_path / "logs"), token="t")
    try:
        assert isinstance(backend, LocalCluster) and backend.cfg is cfg
        assert backend.log_dir == tmp_path / "logs" and backend.pool() == {"n0": []}
    finally:
        backend.close()


def test_build_backend_kubernetes_connects_at_build(tmp_path):
    pytest.importorskip("kubernetes")
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises for a missing file
        build_backend(BackendKind.KUBERNETES, default_cluster(BackendKind.KUBERNETES),
                      kubeconfig=str(tmp_path / "missing"))


def test_worker_flags_are_a_worker_spec():
    args = build_parser().parse_args(worker_args(SPEC, "http://agent:1"))
    assert spec_from_args(args) == SPEC  # all of it: a worker reports it back in /health
    assert args.agent == "http://agent:1"
    no_id = build_parser().parse_args(["worker", "--model", "m", "--rank", "3", "--layers",
                                       "0:1", "--agent", "a", "--num-kv-blocks", "4"])
    assert spec_from_args(no_id).worker_id == "m-r3"


def test_runtime_assignment_round_trips_and_refuses_malformed_ones():
    job = RuntimeAssignment(SPEC, "http://agent:1")
    assert RuntimeAssignment.from_json(json.loads(json.dumps(job.to_json()))) == job
    for bad in ([], {"spec": SPEC.to_json()}, {"spec": "x", "agent": "a"},
                {"spec": SPEC.to_json(), "agent": 5},
                {"spec": {**SPEC.to_json(), "protocol": 99}, "agent": "a"}):
        with pytest.raises(ProtocolError):
            RuntimeAssignment.from_json(bad)


@pytest.mark.multiprocess
def test_a_runtime_refuses_an_assignment_it_cannot_take():
    """A real `hydraserve runtime`: it announces itself, then exits 2 on an assignment for
    another device (a spec it could parse) without serving anything."""
    proc = subprocess.Popen([sys.executable, "-m", "hydraserve.cli", "runtime"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith(RUNTIME_READY)
        job = RuntimeAssignment(WorkerSpec(**{**SPEC.__dict__, "device": "cuda:0"}), "http://a")
        out, err = proc.communicate(json.dumps(job.to_json()) + "\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "cannot become a worker on cuda:0" in err, err


class _Echo(BaseHTTPRequestHandler):
    """Answers every request with the Authorization header it got."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps({"auth": self.headers.get("Authorization")}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def test_each_call_carries_its_own_token():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert call(url, "GET", "/")["auth"] is None
        assert call(url, "POST", "/", {}, token="a")["auth"] == "Bearer a"
        assert json.loads(get_bytes(url, "/", token="b"))["auth"] == "Bearer b"
        assert list(stream(url, "/", {}, token="c")) == [{"auth": "Bearer c"}]
        assert call(url, "GET", "/")["auth"] is None  # nothing stays behind
    finally:
        server.shutdown()
        server.server_close()


DEAD_PID = 2**30  # above any pid_max: no such process


def test_old_run_log_folders_are_pruned_except_live_runs(tmp_path):
    """The newest ``keep`` run folders stay; older ones go unless their run's process lives
    (this test's own pid stands for a run still serving); other names are not touched."""
    import os

    names = [f"serve-20261201-10000{i}-{DEAD_PID}" for i in range(4)]
    names[1] = f"serve-20261201-100001-{os.getpid()}"
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "store.log").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "serve-notes.txt").write_text("a file, not a run")
    removed = prune_run_logs(tmp_path, keep=2)
    assert sorted(d.name for d in removed) == [names[0]]
    left = sorted(d.name for d in tmp_path.iterdir())
    assert left == sorted([*names[1:], "mine", "serve-notes.txt"])
    assert prune_run_logs(tmp_path, keep=0) == [tmp_path / names[2], tmp_path / names[3]]
    assert sorted(d.name for d in tmp_path.iterdir()) == sorted([names[1], "mine",
                                                                  "serve-notes.txt"])


def test_keep_logs_defaults_to_twenty_and_zero_keeps_all():
    args = build_parser().parse_args(["serve"])
    assert args.keep_logs == 20
    assert build_parser().parse_args(["serve", "--keep-logs", "0"]).keep_logs == 0
