# The worker image of the genuine vLLM baseline (vllm_image: hydraserve-worker:vllm in the
# cluster config): vLLM's official OpenAI server image with HydraServe added. Its workers run
# `hydraserve worker --engine vllm --vllm-python python3 ...`: the worker fetches the whole model
# through the node's storage agent, then starts vLLM's server on it with the image's python3.
#
#   docker build -f scripts/kubernetes/docker/worker-vllm.Dockerfile -t hydraserve-worker:vllm .
#
# VLLM_VERSION is the release the README's vLLM comparison used.
ARG VLLM_VERSION=v0.32.0
FROM vllm/vllm-openai:${VLLM_VERSION}

# PIP_BREAK_SYSTEM_PACKAGES: vLLM is installed into the system Python, and so is HydraServe
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1

# the same user as the storage agent (its shared-memory regions are owner-only)
RUN groupadd --gid 10001 hydraserve \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin hydraserve

# --no-deps keeps vLLM's own torch and libraries untouched; the requirements below are
# setup.py's without torch, and pip installs only those the image lacks (no upgrades).
WORKDIR /opt/hydraserve
COPY setup.py README.md ./
COPY hydraserve ./hydraserve
RUN python3 -m pip install \
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
    && python3 -m pip install --no-deps . \
    && python3 -c "import importlib.util as u, hydraserve.worker.vllm_worker; assert u.find_spec('vllm')" \
    && hydraserve worker --help > /dev/null

USER 10001
WORKDIR /home/hydraserve
ENTRYPOINT ["hydraserve"]
CMD ["worker", "--help"]
