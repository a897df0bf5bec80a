#!/usr/bin/env bash
# HART at 1024px on one lent GPU (issue 20): jaxeff's benchmark at the released size, then (optionally) the official
# PyTorch code timed in the same session on the same random weights.
#
#   bash scripts/gpu_hart.sh                 jaxeff only: python -m benchmarks.hart preset=full
#   HART_OFFICIAL_CMD='...' bash scripts/gpu_hart.sh
#
# Step 1 prints s / image at batch 1 (AR + diffusion; and the whole program with a Qwen2-1.5B-sized text encoder and
# the tokenizer decoder), images / s at batch 8, the old fp32 path, the same-size DiT, MACs and the compiled
# program's memory at 1024px (largest batch for 16 GB / 80 GB).
# Step 2 writes random full-size weights in the released hart-0.7b-1024px layout (llm/ + tokenizer/,
# model.safetensors + config.json, `jaxeff.hart.loading.save_hart`) to $HART_WEIGHTS_DIR (default $OUT/hart-random)
# and times jaxeff on them with the released defaults (bf16, batch 1 and 8, context from random features).
# Step 3 runs $HART_OFFICIAL_CMD if set, with HART_WEIGHTS_DIR exported. Nothing of the official code is in this
# repository: the user provides a checkout of mit-han-lab/hart (with its hart_backend kernels built) outside it and
# a command that times it, e.g. a script of their own that loads $HART_WEIGHTS_DIR/llm with the checkout's
# HARTForT2I (use_ema off: the weights are in model.safetensors), builds the tokenizer from
# $HART_WEIGHTS_DIR/tokenizer, and times `autoregressive_infer_cfg` under fp16 autocast at batch 1 and 8 with the
# same cfg 4.5 / top-k 600/300 / more_smooth settings, synchronising CUDA before reading the clock (the checkout's
# latency_profile.py does not). Record the checkout's commit next to the numbers.
#
# Logs go to $OUT (the device tool's output folder) or runs/gpu_hart/<UTC time>/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_hart/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
LOG=$OUT/gpu_hart.log
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HART_WEIGHTS_DIR=${HART_WEIGHTS_DIR:-$OUT/hart-random}

source scripts/step.sh

step env 60 $PY -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())"
step bench 420 $PY -m benchmarks.hart preset=full
step released_layout 300 $PY - <<'EOF'
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.experiment import best_time
from jaxeff.hart import HART, HARTConfig, HARTTokenizer, HARTTransformer, SampleOptions, TokenizerConfig
from jaxeff.hart.loading import save_hart

root = os.environ["HART_WEIGHTS_DIR"]
if not os.path.isdir(os.path.join(root, "llm")):
    save_hart(HARTTransformer(HARTConfig(), rngs=nnx.Rngs(0)), HARTTokenizer(TokenizerConfig(), rngs=nnx.Rngs(1)), root)
hart = HART.from_pretrained(root, dtype=jnp.bfloat16)
cfg = hart.transformer.cfg
for b in (1, 8):
    ctx = jax.random.normal(jax.random.key(0), (b, cfg.context_token, cfg.context_dim))
    t = best_time(lambda: hart.generate(context=ctx, seed=0, opts=SampleOptions()), repeats=5)
    print(f"jaxeff on {root} (bf16, generation + decoding, no text encoder): batch {b}: {t / b:.4f} s / image, "
          f"{b / t:.2f} images / s")
EOF
if [ -n "${HART_OFFICIAL_CMD:-}" ]; then
  step official 600 bash -c "$HART_OFFICIAL_CMD"
else
  echo "=== official: skipped (set HART_OFFICIAL_CMD to time an external mit-han-lab/hart checkout)" | tee -a "$LOG"
fi
grep -v "^WARNING\|^I0000" "$LOG" | tail -60
