#!/usr/bin/env bash
# One check of the device path on a machine with one CUDA GPU and this repository, in under
# 8 minutes: the engine against transformers token by token on CUDA (float32, float16,
# bfloat16; llama, opt, falcon; p = 1 and 2), a p = 2 pipeline of two worker processes on the
# GPU consolidated mid-stream, host-to-device GB/s from a registered shared-memory region against
# pinned and pageable memory, the engine's TPOT and prefill beside transformers, and a cold start
# through `hydraserve serve` with a warm runtime. Each part is time-boxed; a failing part is
# recorded as failed, with its error, and the others still run. Details: benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh [OUT.json] [more gpu_check.py flags, e.g. --parts h2d,speed]
#
# OUT defaults to results/gpu_check.json (every figure and the GPU's name). Exit code 0 when no
# part failed.
#
# What it needs: Python with torch (a CUDA build), transformers, safetensors, tokenizers and
# aiohttp -- what a GPU machine typically has. hydraserve's other dependencies (setup.py) that
# the check imports are installed, if missing, from a folder of wheels, with no index (such a
# machine may have no network). Make that folder on a machine with network, for the GPU
# machine's Python version (`python3 --version` there), before the repository travels there
# (.cache/ is git-ignored, so name it where the copy is made):
#
#   benchmarks/gpu_wheels.sh 3.12        # into .cache/wheels, ~35 MB
#
# (scipy and gguf, the rest of setup.py's list, serve `workload make` and `import-gguf` only.)
# GPU_CHECK_WHEELS overrides the folder; PYTHON the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=results/gpu_check.json
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    OUT="$1"
    shift
fi
WHEELS="${GPU_CHECK_WHEELS:-.cache/wheels}"
PY="${PYTHON:-python3}"

# import name -> pip name, for what the check imports beyond torch and transformers
missing=$("$PY" - <<'EOF'
import importlib.util

need = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus_client",
        "yaml": "pyyaml", "jinja2": "jinja2", "numpy": "numpy", "tqdm": "tqdm",
        "safetensors": "safetensors", "tokenizers": "tokenizers", "aiohttp": "aiohttp"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "== installing from $WHEELS (no index): $missing"
    # shellcheck disable=SC2086 - one word per package
    "$PY" -m pip install --no-index --find-links "$WHEELS" $missing \
        || echo "warning: could not install $missing; the parts that need them will fail"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the driver boxes each part (and all of them: --budget-s, default 420 s); exec: a signal to
# this script reaches it, and it stops the running part's processes
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
