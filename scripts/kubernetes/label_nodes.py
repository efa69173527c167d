"""Mark the cluster for the isolation mode of the next experiment (PAPER.md section 8).

    SHARE=1 python scripts/kubernetes/label_nodes.py                       # a Kubernetes cluster
    SHARE=0 python scripts/kubernetes/label_nodes.py --local cluster.yaml  # the local backend

SHARE=1: GPUs are shared by memory (HydraServe, Serverless vLLM); SHARE=0: every worker gets
whole GPUs (ServerlessLLM). On Kubernetes (the kubeconfig in use, or the in-cluster account;
needs `pip install kubernetes`) every node with an `nvidia.com/gpu` capacity gets the label
`hydraserve.io/share=<0|1>`, which the Kubernetes backend reads. With --local, the `share:` field
of a local cluster YAML is set instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

LABEL = "hydraserve.io/share"


def label_kubernetes(share: bool) -> int:
    try:
        from kubernetes import client, config
    except ImportError:
        print("error: the kubernetes client is not installed (pip install kubernetes)",
              file=sys.stderr)
        return 2
    try:
        config.load_kube_config()
    except Exception:  # noqa: BLE001 - no kubeconfig: try the pod's service account
        config.load_incluster_config()
    api = client.CoreV1Api()
    value = "1" if share else "0"
    labelled = 0
    for node in api.list_node().items:
        gpus = (node.status.capacity or {}).get("nvidia.com/gpu", "0")
        if str(gpus) in ("", "0"):
            continue
        api.patch_node(node.metadata.name, {"metadata": {"labels": {LABEL: value}}})
        print(f"{node.metadata.name}: {gpus} GPU(s), {LABEL}={value}")
        labelled += 1
    if not labelled:
        print("error: no node reports nvidia.com/gpu capacity", file=sys.stderr)
        return 1
    return 0


def label_local(path: Path, share: bool) -> int:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    data["share"] = share
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"{path}: share: {str(share).lower()}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--local", metavar="CLUSTER_YAML", help="set the mode in a local cluster file")
    args = ap.parse_args()
    share = os.environ.get("SHARE")
    if share not in ("0", "1"):
        print("error: set SHARE=1 (shared GPUs) or SHARE=0 (exclusive GPUs)", file=sys.stderr)
        return 2
    if args.local:
        return label_local(Path(args.local), share == "1")
    return label_kubernetes(share == "1")


if __name__ == "__main__":
    sys.exit(main())
