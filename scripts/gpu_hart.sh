#!/usr/bin/env bash
# HART at 1024px on one lent GPU (issue 20): jaxeff's benchmark at the released size, then (optionally) the official
# PyTorch code timed in the same session on the same random weights.
#
#   bash scripts/gpu_hart.sh                 jaxeff only: python -m benchmarks.hart preset=full
#   HART_OFFICIAL_CMD='...' bash scripts/gpu_hart.sh
#
# Step 1 (bench) prints s / image at batch 1 (AR + diffusion; and the whole program with a Qwen2-1.5B-sized text
# encoder and the bf16 tokenizer decoder), images / s at batch 8, the old fp32 path, the same-size DiT, the
# tokenizer decoder alone in bf16 and fp32 (time ratio, PSNR of bf16 against fp32) and MACs, each time printed as
# soon as it is measured.
# Step 2 writes random full-size weights in the released hart-0.7b-1024px layout (llm/ + tokenizer/,
# model.safetensors + config.json, `jaxeff.hart.loading.save_hart`) to $HART_WEIGHTS_DIR (default
# /tmp/hart-random: about 3 GB, kept out of $OUT so it does not travel back) and times jaxeff on them with the
# released defaults (bf16 transformer and decoder, batch 1 and 8, context from random features).
# Step 3 (memory) prints the compiled programs' memory at 1024px per stage and batch and the largest batch for
# 16 GiB / 80 GiB (the most compiles; last, so a slow compile only cuts it short).
# Step 4 runs $HART_OFFICIAL_CMD if set, with HART_WEIGHTS_DIR exported.
# The limits of steps 1-3 add up to 530 s: give the device tool its 600 s maximum (step 4 has
# its own 600 s: a second call). The limits are estimates (this script has not run on a GPU yet); a step that runs
# out keeps what it printed. Nothing of the official code is in this
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
export HART_WEIGHTS_DIR=${HART_WEIGHTS_DIR:-/tmp/hart-random}

source scripts/step.sh

step env 20 $PY -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())"
step bench 240 $PY -m benchmarks.hart preset=full memory=0 repeats=3
step released_layout 150 $PY - <<'EOF'
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
          f"{b / t:.2f} images / s", flush=True)
EOF
step memory 120 $PY -m benchmarks.hart preset=full timing=0
if [ -n "${HART_OFFICIAL_CMD:-}" ]; then
  step official 600 bash -c "$HART_OFFICIAL_CMD"
else
  echo "=== official: skipped (set HART_OFFICIAL_CMD to time an external mit-han-lab/hart checkout)" | tee -a "$LOG"
fi
grep -v "^WARNING\|^I0000" "$LOG" | tail -60
