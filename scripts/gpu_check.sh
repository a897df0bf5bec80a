#!/usr/bin/env bash
# One session on a GPU machine: environment, the compiled Pallas kernels against their references, then the
# benchmarks and experiments that need a GPU, each under its own time limit so one failure does not stop the rest.
#
#   bash scripts/gpu_check.sh [step ...]     steps: env kernels attention gpu_decode channel_norm dcae uvit
#                                            decode hart pallas_all (default: all but gpu_decode, in that order)
#
# Logs go to $OUT (the device tool's output folder) or runs/gpu_check/<UTC time>/: one combined log plus the
# experiments' results.md files. Uses the machine's python3 (jax with CUDA preinstalled); wheels in .whl/ (flax,
# diffusers, ...) are installed to /tmp/site first when the machine lacks them (no network there).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TQDM_MININTERVAL=10
STEPS=${*:-env kernels attention channel_norm dcae uvit decode hart pallas_all}

if ls .whl/*.whl >/dev/null 2>&1; then
  need=$($PY - <<'EOF'
import importlib.metadata as md
def version(name):
    try:
        return tuple(int(x) for x in md.version(name).split(".")[:3])
    except md.PackageNotFoundError:
        return None
wheels = []
if (version("flax") or (0,)) < (0, 12, 9):
    wheels.append("flax-*")
if version("diffusers") is None:
    wheels += ["diffusers-*", "importlib_metadata-*"]
print(" ".join(f".whl/{w}.whl" for w in wheels))
EOF
)
  if [ -n "$need" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $need \
      && export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
fi

source scripts/step.sh

latest_results() {  # copy the newest run's results.md of an experiment next to the log
  local dir
  dir=$(ls -td runs/"$1"/*/ 2>/dev/null | head -1)
  [ -n "$dir" ] && cp "$dir/results.md" "$OUT/$1_results.md" 2>/dev/null
}

for s in $STEPS; do
  case $s in
    env) step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; \
      $PY -c 'import sys, jax, flax; print(sys.version.split()[0], \"jax\", jax.__version__, \"flax\", flax.__version__, jax.devices())'" ;;
    kernels) step kernels 240 env JAX_PLATFORMS= $PY -m pytest -q -rs -p no:cacheprovider tests/test_pallas_device.py \
      tests/test_pallas_channel_norm.py -k device ;;
    attention) step attention 180 $PY -m benchmarks.attention parts=gpu,gpu_decode repeats=5 budget=4096 ;;
    gpu_decode) step gpu_decode 120 $PY -m benchmarks.attention parts=gpu_decode repeats=5 budget=4096 ;;
    channel_norm) step channel_norm 90 $PY -m benchmarks.channel_norm ;;
    dcae) step dcae_f32 120 $PY -m benchmarks.dcae resolution=1024 batch=4 repeats=5
          step dcae_bf16 120 $PY -m benchmarks.dcae resolution=1024 batch=4 repeats=5 dtype=bfloat16 ;;
    uvit) step uvit 200 $PY -m jaxeff.run name=dcae_uvit preset=full batch=16 && latest_results dcae_uvit ;;
    decode) step decode 150 $PY -m benchmarks.llama_decode hidden=2048 layers=16 batch=8 prompt=512 new_tokens=256 \
      repeats=2 ;;
    hart) step hart 150 $PY -m benchmarks.hart preset=full ;;
    pallas_all) step pallas_all 240 env JAX_PLATFORMS= $PY -m pytest -q -p no:cacheprovider tests -k "pallas and not device" ;;
    *) echo "unknown step $s; see the top of $0"; exit 2 ;;
  esac
done
grep -E "passed|failed|rror|^\|" "$LOG" | tail -n 80
