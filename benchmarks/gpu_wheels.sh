#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a GPU machine that has no network: fastapi,
# uvicorn and the rest of what the check imports beyond torch and transformers, for that
# machine's Python (run `python3 --version` there), downloaded here into .cache/wheels
# (git-ignored: name it where the repository is copied to the GPU machine). About 35 MB.
#
#   benchmarks/gpu_wheels.sh [PYTHON_VERSION]     (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
DEST="${GPU_CHECK_WHEELS:-.cache/wheels}"
mkdir -p "$DEST"
python3 -m pip download -q -d "$DEST" --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    fastapi uvicorn prometheus_client pyyaml jinja2 numpy tqdm safetensors tokenizers aiohttp
echo "wheels for Python $PYVER in $DEST: $(ls "$DEST" | wc -l) files, $(du -sh "$DEST" | cut -f1)"
