#!/usr/bin/env bash
# start_server.sh EXPR EXEC_TYPE MODEL_SET BACKEND CV REQ_RATE   (the paper's artifact interface)
#   EXPR 0: the cold-start experiment on a scaled testbed (BACKEND a10 | v100); CV and REQ_RATE
#           are unused. Serves on http://127.0.0.1:${PORT:-8000} until Ctrl-C.
#   EXEC_TYPE: one of the six execution types, or `vllm` (serverless_vllm with the genuine vLLM
#   as the worker; needs a Python with vLLM, see the README).
#   EXPR 1: the end-to-end experiment (not available yet).
# Environment: PORT (default 8000), KEEP_ALIVE (default 30), CLUSTER_BACKEND (local, the
# default, or kubernetes: a real cluster, not available yet).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 EXPR EXEC_TYPE MODEL_SET BACKEND [CV REQ_RATE]" >&2; exit 2
fi
EXPR=$1 EXEC_TYPE=$2 MODEL_SET=$3 BACKEND=$4
here="$(cd "$(dirname "$0")" && pwd)"
if [ "$EXPR" != "0" ]; then
  echo "EXPR $EXPR: only the cold-start experiment (EXPR 0) is available so far" >&2; exit 2
fi
conf="$(mktemp -d)"
trap 'rm -rf "$conf"' EXIT
python "$here/run_figure7_expr.py" --write-configs "$conf" --backends "$BACKEND" \
  --model-sets "$MODEL_SET" --exec-types "$EXEC_TYPE"
case "$EXEC_TYPE" in
  hydraserve) flags=(--exec-type hydraserve --static-p 4) ;;  # static(4), as in the paper
  vllm) flags=(--exec-type serverless_vllm --engine vllm) ;;  # the genuine vLLM (see README)
  *) flags=(--exec-type "$EXEC_TYPE") ;;
esac
hydraserve serve --cluster "$conf/cluster.yaml" --models "$conf/models.yaml" "${flags[@]}" \
  --port "${PORT:-8000}" --keep-alive "${KEEP_ALIVE:-30}" \
  --cluster-backend "${CLUSTER_BACKEND:-local}"
