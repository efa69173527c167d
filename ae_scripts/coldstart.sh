#!/usr/bin/env bash
# coldstart.sh EXEC_TYPE MODEL_SET BACKEND   (the paper's artifact interface)
# Measures the server that start_server.sh runs: 3 cold trials per model (each after the model
# scaled to zero), TTFT = mean of the two smallest; appends to results/figure7/BACKEND.csv.
# Environment: PORT (default 8000), TRIALS (default 3), OUT (results folder; default results/figure7).
set -euo pipefail
if [ $# -ne 3 ]; then echo "usage: $0 EXEC_TYPE MODEL_SET BACKEND" >&2; exit 2; fi
here="$(cd "$(dirname "$0")" && pwd)"
out=()
if [ -n "${OUT:-}" ]; then out=(--out "$OUT"); fi
python "$here/run_figure7_expr.py" --url "http://127.0.0.1:${PORT:-8000}" --exec-types "$1" \
  --model-sets "$2" --backends "$3" --trials "${TRIALS:-3}" "${out[@]}"
