# The control-plane image: the gateway, the model store and the storage agents. No torch: these
# never import it (tests/test_manifests.py checks), so the image stays small and starts fast.
#
#   docker build -f scripts/kubernetes/docker/control.Dockerfile -t hydraserve-control:latest .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 10001 in every HydraServe image: the agent's shared-memory regions are readable by their
# owner only, so the agent and the workers on a node must run as the same user.
RUN groupadd --gid 10001 hydraserve \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin hydraserve

# setup.py's install_requires without torch (tests/test_manifests.py keeps the two lists equal),
# plus the Kubernetes client of the gateway's backend (the `kubernetes` extra).
RUN pip install \
    "safetensors>=0.4" \
    "tokenizers>=0.21.1" \
    "numpy>=1.24" \
    "jinja2>=3.1" \
    "pyyaml>=6.0" \
    "aiohttp>=3.9" \
    "fastapi>=0.110" \
    "uvicorn>=0.30" \
    "prometheus_client>=0.20" \
    "scipy>=1.10" \
    "tqdm>=4.60" \
    "gguf>=0.10" \
    "kubernetes>=29"

WORKDIR /opt/hydraserve
COPY setup.py README.md ./
COPY hydraserve ./hydraserve
# --no-deps: torch is a requirement of the package (the workers need it), not of this image
RUN pip install --no-deps . \
    && python -c "import sys, hydraserve.cli, hydraserve.store.agent, hydraserve.store.remote, \
hydraserve.gateway.app, hydraserve.control.controller; \
assert 'torch' not in sys.modules, 'the control plane imported torch'" \
    && hydraserve --help > /dev/null

USER 10001
WORKDIR /home/hydraserve
ENTRYPOINT ["hydraserve"]
CMD ["--help"]
