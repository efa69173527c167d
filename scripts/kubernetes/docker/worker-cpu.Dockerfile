# The worker image for CPU-only clusters (kind, k3s trials; device: cpu in the cluster config).
#
#   docker build -f scripts/kubernetes/docker/worker-cpu.Dockerfile -t hydraserve-worker:cpu .
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# the same user as the storage agent (its shared-memory regions are owner-only)
RUN groupadd --gid 10001 hydraserve \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin hydraserve

# the CPU build from PyTorch's CPU index (PyPI's default build would pull CUDA libraries)
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

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
