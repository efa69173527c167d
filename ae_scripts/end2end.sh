#!/usr/bin/env bash
# end2end.sh EXEC_TYPE CV REQ_RATE   (the paper's artifact interface)
# Replays the end-to-end trace against the server that `start_server.sh 1 EXEC_TYPE 3 hybrid CV
# REQ_RATE` runs, then analyzes it: results/end2end/EXEC_TYPE-cvCV-rateREQ_RATE/ gets
# trace.jsonl, replay.jsonl and summary.json (TTFT attainment per application and in total,
# GPU GB*s per request from the server's lifecycle log there). ae_scripts/figure9.py,
# figure11.py and figure13.py draw them.
# Environment: PORT (default 8000); PER_APP (default 64) and OUT as given to start_server.sh;
# DURATION (seconds of trace, default 3600), MAX_OUTPUT_TOKENS (cap, default none), SEED
# (default 0), AZURE (the Azure Functions 2021 trace CSV; default: a synthetic trace),
# KEEP_ALIVE (default 30), TPOT_SLO_SCALE (default: TTFT attainment only).
# end2end.sh EXEC_TYPE CV REQ_RATE --sim   runs the same setting at the paper's scale in the
# simulator instead (no server needed; seconds): results/end2end/EXEC_TYPE-cvCV-rateREQ_RATE-sim/.
# With SEEDS=N it runs trace seeds SEED..SEED+N-1 and writes the per-seed summaries and
# results/end2end/sim-aggregate.json (mean and min-max over the seeds, which the figures draw).
set -euo pipefail
if [ $# -lt 3 ] || [ $# -gt 4 ] || { [ $# -eq 4 ] && [ "$4" != "--sim" ]; }; then
  echo "usage: $0 EXEC_TYPE CV REQ_RATE [--sim]" >&2; exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
if [ "${4:-}" = "--sim" ]; then
  sim=(--sim --exec-types "$1" --cv "$2" --rate "$3" --per-app "${PER_APP:-64}"
       --duration "${DURATION:-3600}" --seed "${SEED:-0}" --keep-alive "${KEEP_ALIVE:-30}")
  if [ -n "${OUT:-}" ]; then sim+=(--out "$OUT"); fi
  if [ -n "${AZURE:-}" ]; then sim+=(--azure "$AZURE"); fi
  if [ -n "${SEEDS:-}" ]; then sim+=(--seeds "$SEEDS"); fi
  exec python "$here/run_end2end_expr.py" "${sim[@]}"
fi
args=(--url "http://127.0.0.1:${PORT:-8000}" --exec-types "$1" --cv "$2" --rate "$3"
      --per-app "${PER_APP:-64}" --duration "${DURATION:-3600}" --seed "${SEED:-0}"
      --keep-alive "${KEEP_ALIVE:-30}")
if [ -n "${OUT:-}" ]; then args+=(--out "$OUT"); fi
if [ -n "${MAX_OUTPUT_TOKENS:-}" ]; then args+=(--max-output-tokens "$MAX_OUTPUT_TOKENS"); fi
if [ -n "${AZURE:-}" ]; then args+=(--azure "$AZURE"); fi
if [ -n "${TPOT_SLO_SCALE:-}" ]; then args+=(--tpot-slo-scale "$TPOT_SLO_SCALE"); fi
exec python "$here/run_end2end_expr.py" "${args[@]}"
