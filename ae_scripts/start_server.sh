#!/usr/bin/env bash
# start_server.sh EXPR EXEC_TYPE MODEL_SET BACKEND CV REQ_RATE   (the paper's artifact interface)
#   EXPR 0: the cold-start experiment on a scaled testbed (BACKEND a10 | v100); CV and REQ_RATE
#           are unused. EXEC_TYPE: one of the six execution types, or `vllm` (serverless_vllm
#           with the genuine vLLM as the worker; needs a Python with vLLM, see the README).
#   EXPR 1: the end-to-end experiment: MODEL_SET 3, BACKEND hybrid (2 servers of four A10 at
#           64 Gbps + 4 servers of four V100 at 16 Gbps, 1/100 scale), EXEC_TYPE one of
#           serverless_vllm, serverlessllm, hydraserve, hydraserve_with_cache. The gateway's
#           instance lifecycle log goes to results/end2end/EXEC_TYPE-cvCV-rateREQ_RATE/, where
#           ae_scripts/end2end.sh EXEC_TYPE CV REQ_RATE then replays the trace and analyzes.
# Serves on http://127.0.0.1:${PORT:-8000} until Ctrl-C.
# Environment: PORT (default 8000), KEEP_ALIVE (default 30), CLUSTER_BACKEND (local, the
# default, or kubernetes: the labelled nodes of the cluster in KUBECONFIG, deployed with
# scripts/kubernetes; run it in the cluster, see scripts/kubernetes/README.md); EXPR 1 also
# PER_APP (endpoints per application per model; default 64, the paper's 384 endpoints), OUT
# (results folder; default results/end2end; use the same PER_APP and OUT for end2end.sh) and
# KV_CACHE_MB (KV cache per worker, default 512).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 EXPR EXEC_TYPE MODEL_SET BACKEND [CV REQ_RATE]" >&2; exit 2
fi
EXPR=$1 EXEC_TYPE=$2 MODEL_SET=$3 BACKEND=$4
here="$(cd "$(dirname "$0")" && pwd)"
conf="$(mktemp -d)"
trap 'rm -rf "$conf"' EXIT
if [ "$EXPR" = "1" ]; then
  if [ $# -ne 6 ] || [ "$MODEL_SET" != "3" ] || [ "$BACKEND" != "hybrid" ]; then
    echo "usage: $0 1 EXEC_TYPE 3 hybrid CV REQ_RATE" >&2; exit 2
  fi
  CV=$5 RATE=$6
  e2e=(python "$here/run_end2end_expr.py" --exec-types "$EXEC_TYPE" --cv "$CV" --rate "$RATE"
       --per-app "${PER_APP:-64}")
  if [ -n "${OUT:-}" ]; then e2e+=(--out "$OUT"); fi
  run="$("${e2e[@]}" --run-dir)"
  mkdir -p "$run"
  rm -f "$run/lifecycle.jsonl"
  "${e2e[@]}" --write-configs "$conf"
  exec hydraserve serve --cluster "$conf/cluster.yaml" --models "$conf/models.yaml" \
    --exec-type "$EXEC_TYPE" --port "${PORT:-8000}" --keep-alive "${KEEP_ALIVE:-30}" \
    --lifecycle-log "$run/lifecycle.jsonl" --kv-cache-mb "${KV_CACHE_MB:-512}" \
    --cluster-backend "${CLUSTER_BACKEND:-local}"
fi
if [ "$EXPR" != "0" ]; then
  echo "EXPR $EXPR: choose 0 (cold start) or 1 (end to end)" >&2; exit 2
fi
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
