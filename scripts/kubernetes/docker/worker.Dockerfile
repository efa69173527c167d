# The worker image for NVIDIA GPUs (worker_image: hydraserve-worker:cuda in the cluster config).
# The gateway starts it as `hydraserve worker ...`, one pod per pipeline stage.
#
#   docker build -f scripts/kubernetes/docker/worker.Dockerfile -t hydraserve-worker:cuda .
#
# torch's CUDA wheels carry their own CUDA libraries; TORCH_INDEX picks the CUDA build and must
# be one that torch TORCH_VERSION is published for and that the nodes' driver supports.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# the same user as the storage agent (its shared-memory regions are owner-only)
RUN groupadd --gid 10001 hydraserve \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin hydraserve

# torch first and pinned: an unpinned requirement would pull whatever build PyPI has
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/hydraserve
COPY setup.py README.md ./
COPY hydraserve ./hydraserve
RUN pip install . \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__" \
    && hydraserve worker --help > /dev/null

USER 10001
WORKDIR /home/hydraserve
ENTRYPOINT ["hydraserve"]
CMD ["worker", "--help"]
