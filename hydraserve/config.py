"""Typed configuration, built once at the entry point and passed down.

Three files a user may write (YAML):

cluster::

    device: cpu                # where workers run the model: cpu or cuda
    share: true                # GPUs shared by memory (SHARE=1) or exclusive (SHARE=0)
    storage: {egress_gbps: 32} # the remote store's egress limit (null: unlimited)
    warm_runtimes: 0           # pre-started worker runtimes per server (serve --warm-runtime)
    scale:                     # sizes and NICs below are in the paper's units (ScaleConfig)
      size_scale: 100          # a 130 MB checkpoint counts as 13 GB; 16 Gbps runs at 0.16 Gbps
      after_fetch_ms: 2000     # "everything after the fetch" in the TTFT model
      emulate_gpu_costs: false # CPU stand-ins emulate a stock vLLM engine's GPU costs
    servers:
      - {name: a10-0, gpus: [24], nic_gbps: 16, host_memory_gb: 188, cache_gb: 0}
    kubernetes:                # only with `serve --cluster-backend kubernetes` (KubernetesConfig);
      namespace: hydraserve    # `servers` then come from the labelled nodes and may be left out

models::

    models:
      - {name: llama-2-7b, path: /models/llama-2-7b, ttft_slo_s: 7.5, tpot_slo_ms: 200}

and the gateway's settings, which come from ``hydraserve serve`` flags.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """A configuration file is missing, malformed, or inconsistent."""


@dataclass(frozen=True)
class ServerConfig:
    name: str
    gpus: tuple[float, ...]  # memory budget of each GPU, GB
    nic_gbps: float
    host_memory_gb: float = 64.0
    cache_gb: float = 0.0


@dataclass(frozen=True)
class ScaleConfig:
    """How this cluster maps onto the paper's units. The control plane reasons in the paper's
    GB and Gbps (its constants, 5 GB KV reserve, 6 GB absorption, apply unchanged); a model of B
    bytes counts as B * size_scale / 1e9 GB, and an agent's real NIC limit is nic_gbps /
    size_scale, so fetch times in seconds are the paper's."""

    size_scale: float = 1.0
    after_fetch_ms: float = 2000.0  # "everything after the fetch" in the TTFT model
    # The servers are CPU stand-ins for GPU servers named after their GPU kind (a10-*, v100-*;
    # the scaled testbeds): the workers of presets whose runtime is a stock vLLM engine emulate
    # its GPU-side costs, its profiling pass and its loader's copy rate (`WorkerSpec.profile_s`,
    # ``load_gbs``), with the simulator's constants for that GPU. Off for real GPU clusters.
    emulate_gpu_costs: bool = False


@dataclass(frozen=True)
class KubernetesConfig:
    """Where and how the Kubernetes backend creates worker pods (scripts/kubernetes/ ships the
    manifests these defaults match)."""

    namespace: str = "hydraserve"
    gateway_name: str = "hydraserve"  # label of this gateway's pods (orphans are found by it)
    worker_image: str = "hydraserve-worker:cuda"
    vllm_image: str = "hydraserve-worker:vllm"  # workers with --engine vllm
    image_pull_policy: str = "IfNotPresent"
    gpu_resource: str | None = "nvidia.com/gpu"  # exclusive GPUs (SHARE=0); None: no claim
    share_resource: str | None = "aliyun.com/gpu-mem"  # GPUs shared by memory (SHARE=1)
    share_unit_gb: float = 1.0  # one unit of share_resource, in GB
    store_url: str | None = "http://hydraserve-store:8100"  # None: the store pod's address
    agent_port: int = 8101
    worker_port: int = 8200
    stage_port: int = 8201
    grace_period_s: int = 10
    default_nic_gbps: float = 16.0  # for nodes without the hydraserve.io/nic-gbps label
    start_timeout_s: float = 120.0  # agents (and the store) must be ready by then


@dataclass(frozen=True)
class ClusterConfig:
    servers: tuple[ServerConfig, ...]
    device: str = "cpu"
    share: bool = True
    egress_gbps: float | None = None
    scale: ScaleConfig = ScaleConfig()
    kubernetes: KubernetesConfig | None = None
    # pre-started worker runtimes kept per server (a platform feature, not the paper's; each
    # holds a process with torch imported: host memory, and on CUDA a context on the GPU)
    warm_runtimes: int = 0
    # seconds a process the control plane started (store, agents, workers, runtimes) outlives
    # its control plane's last lease renewal before it exits by itself (hydraserve.lease)
    orphan_grace_s: float = 60.0

    def with_host_cache(self, enabled: bool) -> "ClusterConfig":
        """This cluster with the servers' host-memory model caches on, or all set to 0 (an
        execution type without a cache must not find models left in host memory)."""
        if enabled:
            return self
        return dataclasses.replace(self, servers=tuple(dataclasses.replace(s, cache_gb=0.0)
                                                       for s in self.servers))

    def server(self, name: str) -> ServerConfig:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass(frozen=True)
class ModelConfigEntry:
    name: str
    path: str
    ttft_slo_s: float = 7.5
    tpot_slo_ms: float | None = None
    profiled_tpot_ms: float | None = None
    size_gb: float | None = None  # default: the checkpoint's bytes
    owned_by: str = "hydraserve"  # what GET /v1/models says owns the model


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    exec_type: str = "hydraserve"
    static_p: int | None = None  # force `static(p)` placement (the paper's cold-start runs)
    keep_alive_s: float = 30.0
    batch_capacity: int = 8  # requests per instance (8p for a p-stage pipeline)
    max_queue: int = 1024  # queued requests per model before 429
    retry_after_s: int = 2  # the Retry-After of a 429 (a full queue)
    sse_heartbeat_s: float = 10.0  # an SSE comment after this long without an event (0: never)
    queue_timeout_s: float = 300.0  # a request no instance could take by then fails with 503
    failover_retries: int = 3  # times one request is placed again after its instance was lost
    admin_token: str | None = None
    max_model_len: int = 3072
    max_new_tokens: int = 1024
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413
    max_body_depth: int = 64  # JSON nested deeper gets 400
    kv_cache_mb: int = 128  # per worker
    log_dir: str | None = None
    lifecycle_log: str | None = None  # JSONL of instance creation/consolidation/deletion (cost)
    engine: str = "hydraserve"  # the workers' engine: hydraserve, or vllm (p = 1 only)
    vllm_python: str | None = None


def _load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def cluster_from_dict(d: dict) -> ClusterConfig:
    try:
        servers = tuple(ServerConfig(name=str(s["name"]), gpus=tuple(float(g) for g in s["gpus"]),
                                     nic_gbps=float(s["nic_gbps"]),
                                     host_memory_gb=float(s.get("host_memory_gb", 64.0)),
                                     cache_gb=float(s.get("cache_gb", 0.0)))
                        for s in d.get("servers") or ())
        scale = _scale_from_dict(d.get("scale") or {})
        egress = (d.get("storage") or {}).get("egress_gbps")
        kube = d.get("kubernetes")
        cfg = ClusterConfig(servers=servers, device=str(d.get("device", "cpu")),
                            share=bool(d.get("share", True)),
                            egress_gbps=None if egress is None else float(egress), scale=scale,
                            kubernetes=None if kube is None else kubernetes_from_dict(kube),
                            warm_runtimes=int(d.get("warm_runtimes", 0)))
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"cluster config: {e!r}") from None
    names = [s.name for s in cfg.servers]
    if not names and cfg.kubernetes is None:
        raise ConfigError("cluster config: no servers")
    if len(set(names)) != len(names) or not all(NAME.match(n) for n in names):
        raise ConfigError(f"cluster config: server names must be unique and simple: {names}")
    if cfg.warm_runtimes < 0:
        raise ConfigError("cluster config: warm_runtimes must be >= 0")
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"cluster config: device must be cpu or cuda, not {cfg.device!r}")
    return cfg


def _scale_from_dict(d: dict) -> ScaleConfig:
    if not isinstance(d, dict):
        raise ConfigError("cluster config: `scale` must be a mapping")
    out = {}
    for k, v in d.items():
        if k == "emulate_gpu_costs":
            if not isinstance(v, bool):
                raise ConfigError(f"cluster config: scale.emulate_gpu_costs must be true or "
                                  f"false, not {v!r}")
            out[k] = v
        else:
            out[k] = float(v)
    return ScaleConfig(**out)


def kubernetes_from_dict(d: dict) -> KubernetesConfig:
    if not isinstance(d, dict):
        raise ConfigError("cluster config: `kubernetes` must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(KubernetesConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"cluster config: kubernetes: unknown key(s) {unknown}; "
                          f"known: {sorted(fields)}")
    out = {}
    for k, v in d.items():
        default = getattr(KubernetesConfig, k)
        if v is None or isinstance(default, str) or default is None:
            out[k] = None if v is None else str(v)
        else:
            out[k] = type(default)(v)
    return KubernetesConfig(**out)


def cluster_to_dict(cfg: ClusterConfig) -> dict:
    """The cluster YAML of ``cfg`` (`cluster_from_dict` reads it back unchanged)."""
    return {"device": cfg.device, "share": cfg.share,
            "storage": {"egress_gbps": cfg.egress_gbps},
            "scale": dataclasses.asdict(cfg.scale),
            "servers": [{"name": s.name, "gpus": list(s.gpus), "nic_gbps": s.nic_gbps,
                         "host_memory_gb": s.host_memory_gb, "cache_gb": s.cache_gb}
                        for s in cfg.servers],
            **({"warm_runtimes": cfg.warm_runtimes} if cfg.warm_runtimes else {}),
            **({"kubernetes": dataclasses.asdict(cfg.kubernetes)} if cfg.kubernetes else {})}


def load_cluster(path: str | Path) -> ClusterConfig:
    return cluster_from_dict(_load_yaml(path))


def model_entry_from_dict(m: dict, base: Path | None = None) -> ModelConfigEntry:
    """One model entry (a models YAML item or an admin API body); every field of
    `ModelConfigEntry` is read here and nowhere else. Unknown keys are an error."""
    if not isinstance(m, dict):
        raise ConfigError(f"a model entry must be a mapping, not {type(m).__name__}")
    known = {f.name for f in dataclasses.fields(ModelConfigEntry)}
    unknown = sorted(set(m) - known)
    if unknown:
        raise ConfigError(f"model entry: unknown field(s) {unknown}; known: {sorted(known)}")
    opt = lambda k: None if m.get(k) is None else float(m[k])  # noqa: E731
    try:
        path = Path(m["path"])
        if base is not None and not path.is_absolute():
            path = base / path
        entry = ModelConfigEntry(name=str(m["name"]), path=str(path),
                                 ttft_slo_s=float(m.get("ttft_slo_s", 7.5)),
                                 tpot_slo_ms=opt("tpot_slo_ms"),
                                 profiled_tpot_ms=opt("profiled_tpot_ms"), size_gb=opt("size_gb"),
                                 owned_by=m.get("owned_by") or "hydraserve")
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model entry: {e!r}") from None
    if not (isinstance(entry.owned_by, str) and entry.owned_by.isprintable()
            and len(entry.owned_by) <= 256):
        raise ConfigError(f"model {entry.name}: owned_by must be printable text of at most 256 "
                          "characters")
    if not NAME.match(entry.name):
        raise ConfigError(f"model name {entry.name!r} must match {NAME.pattern}")
    if entry.size_gb is not None and entry.size_gb <= 0:
        raise ConfigError(f"model {entry.name}: size_gb must be positive")
    return entry


def models_from_dict(d: dict, base: Path | None = None) -> list[ModelConfigEntry]:
    try:
        items = d["models"]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"models config: {e!r}") from None
    return [model_entry_from_dict(m, base) for m in items]


def load_models(path: str | Path) -> list[ModelConfigEntry]:
    return models_from_dict(_load_yaml(path), Path(path).parent)


def default_local_cluster() -> ClusterConfig:
    """The embedded default: the paper's V100 servers (16 Gbps NIC, 368 GB host) scaled by
    1/100, with one 32 GB GPU each -- 4 servers. The default model (269 MB at float16) counts as
    a 26.9 GB model, the paper's 13B class, which the paper serves on V100s because it does not
    fit an A10's 24 GB; each NIC really moves 0.16 Gbps, so fetches take the paper's seconds.
    4 s after the fetch covers this machine's worker start (Python and torch imports on shared
    cores)."""
    return ClusterConfig(
        servers=tuple(ServerConfig(f"server{i}", (32.0,), 16.0, 368.0, 0.0) for i in range(4)),
        device="cpu", share=True, egress_gbps=None,
        scale=ScaleConfig(size_scale=100.0, after_fetch_ms=4000.0))
