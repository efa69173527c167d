"""Mark the cluster's servers for HydraServe and the isolation mode of the next experiment.

    SHARE=1 python scripts/kubernetes/label_nodes.py --nic-gbps 16           # a Kubernetes cluster
    SHARE=1 python scripts/kubernetes/label_nodes.py --nodes kind-worker,kind-worker2 \\
        --gpus 1 --gpu-memory-gb 24 --nic-gbps 10                           # CPU-only (kind, k3s)
    SHARE=0 python scripts/kubernetes/label_nodes.py --local cluster.yaml    # the local backend

SHARE=1: GPUs are shared by memory (HydraServe, Serverless vLLM); SHARE=0: every worker gets
whole GPUs (ServerlessLLM). With --local, the `share:` field of a local cluster YAML is set.

On Kubernetes (the kubeconfig in use, or the in-cluster account; needs `pip install kubernetes`)
a node is a HydraServe server iff it carries the label hydraserve.io/share=<0|1>, which this
script sets on the chosen nodes: those given by --nodes, or else every node with an
`nvidia.com/gpu` capacity. Optional labels, each set only when its option is given (a label
that is not given is left as it is):

  hydraserve.io/nic-gbps       --nic-gbps      the node's NIC bandwidth, Gbps
  hydraserve.io/cache-gb       --cache-gb      host memory for the model cache, GB (give the
                                               storage agents the same value: CACHE_GB)
  hydraserve.io/gpus           --gpus          GPUs, and GPU memory per GPU in GB, for nodes
  hydraserve.io/gpu-memory-gb  --gpu-memory-gb without NVIDIA GPU feature discovery (which
                                               labels nvidia.com/gpu.memory) or without GPUs

It only lists, reads and patches nodes (the hydraserve-nodes ClusterRole allows exactly that).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

PREFIX = "hydraserve.io/"
LABEL = PREFIX + "share"
NIC_LABEL = PREFIX + "nic-gbps"
CACHE_LABEL = PREFIX + "cache-gb"
GPUS_LABEL = PREFIX + "gpus"
GPU_MEMORY_LABEL = PREFIX + "gpu-memory-gb"
GFD_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB per GPU, set by GPU feature discovery
GPU_RESOURCE = "nvidia.com/gpu"


def label_value(x: float) -> str:
    """A number as a label value: no exponent, no sign, no trailing zeros ("16", "0.5")."""
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{x}: expected a non-negative number")
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    return s or "0"


def node_labels(share: bool, nic_gbps: float | None = None, cache_gb: float | None = None,
                gpus: int | None = None, gpu_memory_gb: float | None = None) -> dict[str, str]:
    """The labels to set on every chosen node."""
    labels = {LABEL: "1" if share else "0"}
    if nic_gbps is not None:
        labels[NIC_LABEL] = label_value(nic_gbps)
    if cache_gb is not None:
        labels[CACHE_LABEL] = label_value(cache_gb)
    if gpus is not None:
        labels[GPUS_LABEL] = str(int(gpus))
    if gpu_memory_gb is not None:
        labels[GPU_MEMORY_LABEL] = label_value(gpu_memory_gb)
    return labels


def _gpu_capacity(node) -> str:
    return str(((node.status and node.status.capacity) or {}).get(GPU_RESOURCE, "0") or "0")


def label_kubernetes(api, labels: dict[str, str], nodes: list[str] | None = None) -> int:
    """Patch ``labels`` onto the chosen nodes through ``api`` (a CoreV1Api: list_node, read_node
    and patch_node only)."""
    if nodes:
        chosen = []
        for name in nodes:
            try:
                chosen.append(api.read_node(name))
            except Exception as e:  # noqa: BLE001 - ApiException 404, or no access
                print(f"error: node {name}: {getattr(e, 'reason', None) or e}", file=sys.stderr)
                return 1
    else:
        chosen = [n for n in api.list_node().items if _gpu_capacity(n) not in ("", "0")]
        if not chosen:
            print(f"error: no node reports {GPU_RESOURCE} capacity (name the nodes with --nodes)",
                  file=sys.stderr)
            return 1
    for node in chosen:
        name = node.metadata.name
        api.patch_node(name, {"metadata": {"labels": labels}})
        gpus = _gpu_capacity(node)
        print(f"{name}: {gpus} GPU(s), " + ", ".join(f"{k}={v}" for k, v in labels.items()))
        known = node.metadata.labels or {}
        if GPUS_LABEL not in labels and gpus in ("", "0") and GPUS_LABEL not in known:
            print(f"warning: {name} has no {GPU_RESOURCE} capacity: give --gpus and "
                  f"--gpu-memory-gb, or the backend sees no GPU there", file=sys.stderr)
        elif (GPU_MEMORY_LABEL not in labels and GFD_MEMORY_LABEL not in known
              and GPU_MEMORY_LABEL not in known):
            print(f"warning: {name} has no {GFD_MEMORY_LABEL} label (NVIDIA GPU feature "
                  f"discovery): give --gpu-memory-gb", file=sys.stderr)
    return 0


def _core_api():
    from kubernetes import client, config

    try:
        config.load_kube_config()
    except Exception:  # noqa: BLE001 - no kubeconfig: try the pod's service account
        config.load_incluster_config()
    return client.CoreV1Api()


def label_local(path: Path, share: bool) -> int:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    data["share"] = share
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"{path}: share: {str(share).lower()}")
    return 0


def _nonneg(kind):
    def parse(s: str):
        try:
            x = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not math.isfinite(x) or x < 0:
            raise argparse.ArgumentTypeError(f"{s!r} must be a non-negative number")
        return x
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--local", metavar="CLUSTER_YAML", help="set the mode in a local cluster file")
    ap.add_argument("--nodes", metavar="A,B", default=None,
                    help="label these nodes (default: every node with nvidia.com/gpu capacity)")
    ap.add_argument("--nic-gbps", type=_nonneg(float), default=None, metavar="G",
                    help="NIC bandwidth of the nodes, Gbps")
    ap.add_argument("--cache-gb", type=_nonneg(float), default=None, metavar="G",
                    help="host memory for the model cache, GB")
    ap.add_argument("--gpus", type=_nonneg(int), default=None, metavar="N",
                    help="GPUs per node (nodes without GPU feature discovery)")
    ap.add_argument("--gpu-memory-gb", type=_nonneg(float), default=None, metavar="G",
                    help="memory per GPU, GB (with --gpus)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    share = os.environ.get("SHARE")
    if share not in ("0", "1"):
        print("error: set SHARE=1 (shared GPUs) or SHARE=0 (exclusive GPUs)", file=sys.stderr)
        return 2
    k8s_only = [f"--{k.replace('_', '-')}" for k in ("nodes", "nic_gbps", "cache_gb", "gpus",
                                                     "gpu_memory_gb")
                if getattr(args, k) is not None]
    if args.local:
        if k8s_only:
            print(f"error: {', '.join(k8s_only)}: Kubernetes only (a local cluster YAML has "
                  "these per server)", file=sys.stderr)
            return 2
        return label_local(Path(args.local), share == "1")
    if (args.gpus is None) != (args.gpu_memory_gb is None):
        print("error: give --gpus and --gpu-memory-gb together", file=sys.stderr)
        return 2
    nodes = None
    if args.nodes is not None:
        nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
        if not nodes:
            print("error: --nodes: no node names", file=sys.stderr)
            return 2
    labels = node_labels(share == "1", args.nic_gbps, args.cache_gb, args.gpus, args.gpu_memory_gb)
    try:
        api = _core_api()
    except ImportError:
        print("error: the kubernetes client is not installed (pip install kubernetes)",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - neither a kubeconfig nor a pod's service account
        print(f"error: no Kubernetes configuration: {e}", file=sys.stderr)
        return 2
    return label_kubernetes(api, labels, nodes)


if __name__ == "__main__":
    sys.exit(main())
