"""The cluster backends by kind: what ``hydraserve serve --cluster-backend`` chooses from.

Each backend is imported only when it is built: the Kubernetes one needs the ``kubernetes``
client package, which a local run never imports.
"""
from __future__ import annotations

import enum

from hydraserve.cluster.base import ClusterBackend
from hydraserve.config import ClusterConfig, KubernetesConfig, default_local_cluster


class BackendKind(str, enum.Enum):
    """Where workers run."""

    LOCAL = "local"  # processes on this machine, the cluster file's servers emulated
    KUBERNETES = "kubernetes"  # worker pods on a cluster's labelled nodes


def default_cluster(kind: BackendKind) -> ClusterConfig:
    """The cluster config of ``kind`` when no cluster file is given. A Kubernetes backend finds
    its servers (the labelled nodes) itself: it starts from none."""
    if BackendKind(kind) is BackendKind.KUBERNETES:
        return ClusterConfig(servers=(), device="cuda", kubernetes=KubernetesConfig())
    return default_local_cluster()


def build_backend(kind: BackendKind, cluster_cfg: ClusterConfig, *, log_dir: str | None = None,
                  token: str | None = None, kubeconfig: str | None = None,
                  home: str | None = None) -> ClusterBackend:
    """A new backend of ``kind`` for ``cluster_cfg``; nothing is started yet.

    ``token``: the cluster token its calls carry; ``log_dir`` (local): where the store's, the
    agents' and the workers' logs go; ``home`` (local): the cluster's folder, where a
    successor finds it (None: a temporary one); ``kubeconfig`` (Kubernetes): the file to connect with
    (None: the pod's service account, else ~/.kube/config). Connecting to a Kubernetes cluster
    happens here, so a missing cluster raises here."""
    if BackendKind(kind) is BackendKind.KUBERNETES:
        from hydraserve.cluster.kubernetes import KubernetesCluster, api_client

        return KubernetesCluster(cluster_cfg, api_client(kubeconfig), token=token)
    from hydraserve.cluster.local import LocalCluster

    return LocalCluster(cluster_cfg, log_dir, token=token, home=home)
