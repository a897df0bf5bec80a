#!/usr/bin/env bash
# Issue 15 on a lent GPU: the compiled-kernel checks (LServe engine end to end included), then per context the
# end-to-end serving benchmark at Llama-3-8B size, LServe vs itself dense (benchmarks/lserve.py) and DuoAttention's
# GQA chunked prefill (benchmarks/duo_attention.py, with its decode sweep at 65536 tokens), one step each under its own
# time limit. Not run yet (no GPU in the session that wrote the two new steps).
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
  step "lserve_$ctx" 540 $PY -m benchmarks.lserve preset=full context="$ctx"
  step "duo_gqa_$ctx" 540 $PY -m benchmarks.duo_attention preset=full mha=0 context="$ctx"
done
grep -E "passed|failed|rror|===|engine|lserve|duo|dense|GQA|transformers" "$LOG" | tail -n 100
