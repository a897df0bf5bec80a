"""`make bench name=foreact [preset=reduced|full] [layers=..] [repeats=..]`

ForeAct's foresight generator (random weights, float32; text encoding and DC-AE excluded), measured side by side in
one run:
1. sampling latency vs solver steps (8 / 20) and guidance branches (3-way image+text CFG / 2-way text CFG), the
   whole compiled sampler (`jaxeff.foreact.sample`), one 640x480 view: 15x20 DC-AE-f32 latents = 300 target + 300
   source tokens;
2. one transformer forward on DC-AE f32c32 latents (15x20 = 300 tokens per image) vs an f8 latent of the same frame
   (60x80 = 4800 tokens per image, the SD-VAE-style alternative), the cost DC-AE's compression saves.
Times are the best of `repeats` after compilation; on CPU read the ratios, not the seconds.
`reduced` (the default, for CPU): SANA-1600M-512's head sizes and caption width with 4 layers of 8 heads (D = 256);
`full`: the 1600M-512 preset (20 layers, D = 2240; for a GPU/TPU).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import best_time, parse_preset
from jaxeff.foreact import SANA_1600M_512, ForesightGenerator, sample

PRESETS = {
    "reduced": {"layers": 4, "heads": 8, "repeats": 3, "f8": 1},
    "full": {"layers": 20, "heads": 70, "repeats": 3, "f8": 1},
}
CAPTION_TOKENS = 64  # a short prompt plus the system prompt, left-padded


def main(argv: list[str]) -> None:
    opts = parse_preset(argv, PRESETS)
    cfg = dataclasses.replace(SANA_1600M_512, num_layers=opts["layers"])
    if opts["heads"] != SANA_1600M_512.num_attention_heads:  # a narrower model: 32-d heads in both attentions
        d = opts["heads"] * 32
        cfg = dataclasses.replace(cfg, num_attention_heads=opts["heads"], num_cross_attention_heads=opts["heads"],
                                  cross_attention_head_dim=32, cross_attention_dim=d)
    print(f"ForeAct generator: {cfg.num_layers} layers, D = {cfg.inner_dim}, float32; jax {jax.__version__} "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind}); {os.cpu_count()} CPUs; best of "
          f"{opts['repeats']} after compilation")
    model = ForesightGenerator(cfg, rngs=nnx.Rngs(0))
    key = jax.random.key(0)
    lat = lambda h, w: jax.random.normal(key, (1, h, w, cfg.in_channels))
    cap = jax.random.normal(key, (1, CAPTION_TOKENS, cfg.caption_channels))
    mask = jnp.ones((1, CAPTION_TOKENS), jnp.int32)

    print("\n1. sampling latency (one 640x480 view, 300 + 300 tokens)")
    times = {}
    for steps in (8, 20):
        for branches in (3, 2):
            def run(steps=steps, branches=branches):
                out = sample(model, [lat(15, 20)], [lat(15, 20)], cap, mask, cap, mask,
                             null_sources=[lat(15, 20)] if branches == 3 else None, num_steps=steps)
                jax.block_until_ready(out)
            run()  # compile
            times[steps, branches] = best_time(run, repeats=opts["repeats"])
            print(f"  {steps:2d} steps, {branches} CFG branches: {1000 * times[steps, branches]:9.1f} ms "
                  f"({times[steps, branches] / times[8, 3]:.2f}x the 8-step 3-branch default)")

    print("\n2. one transformer forward, batch 1: DC-AE f32 latents vs an f8 latent of the same 640x480 frame")
    fwd = nnx.jit(lambda m, t, s, tt, c, k: m([t], [s], tt, c, k))
    res = {}
    for name, (h, w) in (("f32 (15x20 = 300 tokens)", (15, 20)), ("f8 (60x80 = 4800 tokens)", (60, 80))):
        if name.startswith("f8") and not opts["f8"]:
            continue
        args = (model, lat(h, w), lat(h, w), jnp.array([500]), cap, mask)
        jax.block_until_ready(fwd(*args))
        res[name] = best_time(lambda args=args: jax.block_until_ready(fwd(*args)), repeats=opts["repeats"])
        print(f"  {name:26s}: {1000 * res[name]:9.1f} ms")
    if len(res) == 2:
        a, b = res.values()
        print(f"  f8 / f32 forward time: {b / a:.1f}x (tokens: 16x)")


if __name__ == "__main__":
    main(sys.argv[1:])
