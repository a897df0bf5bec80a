#!/usr/bin/env bash
# Issue 15 on a lent GPU: the compiled-kernel checks (LServe engine end to end included), then the end-to-end serving
# benchmark at Llama-3-8B size, one context per step, each under its own time limit.
#
#   bash scripts/gpu_serving.sh [context ...]     default: 32768 (add 65536 131072 262144 when the time allows)
#
# The environment (wheels from .whl/ into /tmp/site when the machine lacks them) comes from scripts/gpu_check.sh.
# Logs go to $OUT (the device tool's output folder) or runs/gpu_serving/<UTC time>/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_serving/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
LOG=$OUT/gpu_serving.log
PY=${PYTHON:-python3}
OUT=$OUT bash scripts/gpu_check.sh env >>"$LOG" 2>&1
[ -d /tmp/site ] && export PYTHONPATH=$PWD:${PYTHONPATH:-}:/tmp/site || export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10

source scripts/step.sh

step device_tests 300 env JAX_PLATFORMS= $PY -m pytest -q -rs -p no:cacheprovider tests/test_pallas_device.py --durations=10
for ctx in ${*:-32768}; do
  step "serving_$ctx" 540 $PY -m benchmarks.serving preset=full context="$ctx"
done
grep -E "passed|failed|rror|===|engine|lserve|duo|transformers" "$LOG" | tail -n 60
