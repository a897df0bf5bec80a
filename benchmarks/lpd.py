"""make bench name=lpd: LPD K-step parallel decoding vs one-token-per-step (raster) decoding, same model, one run.

Random weights (timing does not depend on them). Both paths are the same KV-cached program (`jaxeff.lpd.generate`,
one `lax.fori_loop`), with CFG (doubled batch) and sampling at temperature 1; only the schedule differs: N steps of
one token vs the official 256px schedules (20 and 32 steps). Prints seconds per image (best of `repeats`, after a
compile + warm-up call) and the ratio to the N-step decode. The VQ decoder is excluded.

Presets: `reduced` (default, CPU: a small model, 256 tokens) and `full` (the released L-256 size, GPU/TPU; the
paper's A100 bf16 figures are L-256 / 20 steps: 0.28 s at batch 1, 139 img/s at batch 64).
Overrides: key=value for dim, depth, heads, batch, repeats, preset (reduced|full).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from flax import nnx

from benchmarks import best_time, parse_preset
from jaxeff.lpd import LPD, LPDConfig, generate, schedules
from jaxeff.lpd.orders import batched_orders

PRESETS = {
    "reduced": {"dim": 256, "depth": 4, "heads": 4, "batch": 1, "repeats": 3},
    "full": {"dim": 1024, "depth": 24, "heads": 16, "batch": 1, "repeats": 5},
}


def main(argv):
    o = parse_preset(argv, PRESETS)
    cfg = LPDConfig(dim=o["dim"], depth=o["depth"], num_heads=o["heads"], grid_size=16, proj_dropout=0.0)
    model = LPD(cfg, rngs=nnx.Rngs(0))
    model.eval()
    b = o["batch"]
    labels = np.arange(b) % cfg.num_classes
    runs = {"256 steps (raster)": ((1,) * 256, batched_orders("raster", b, 16))}
    for steps in (32, 20):
        runs[f"{steps} steps (LPD)"] = (schedules.group_sizes(256, steps), batched_orders("random", b, 16, seed=1))
    dev = jax.devices()[0].device_kind
    print(f"LPD decode, 256 tokens, dim {cfg.dim}, depth {cfg.depth}, heads {cfg.num_heads}, CFG 4.8, batch {b}, "
          f"device {dev}")
    print(f"{'schedule':<22}{'s / image':>12}{'img / s':>10}{'speed-up':>10}")
    base = None
    for name, (sizes, orders) in runs.items():
        fn = lambda s=sizes, od=orders: generate(model, s, od, labels, cfg=4.8, key=jax.random.key(0))["tokens"]  # noqa: E731
        sec = best_time(fn, repeats=o["repeats"]) / b
        base = base or sec
        print(f"{name:<22}{sec:>12.4f}{1 / sec:>10.1f}{base / sec:>9.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
