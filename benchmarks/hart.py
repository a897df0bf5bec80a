"""make bench name=hart: HART generation vs the matched DiT diffusion baseline, same device, one run.

Both models get the same width / depth / heads and random weights; both use classifier-free guidance (doubled
batch). HART: KV-cached multi-scale AR generation over the 256px scale list (10 scales, 16x16 latent) + the
8-step residual diffusion head. DiT: the same-size transformer on an f8 latent (32x32x4, patch 2 -> 256 tokens)
for `dit_steps` DDIM steps. Decoders (tokenizer / VAE) are excluded from both. Prints seconds per image
(best of `repeats`, after a compile + warm-up call), the time ratio, and analytic MACs with their ratio.

Defaults are a reduced size for CPU; `preset=full` is 1024px at the released size (GPU/TPU).
Overrides: key=value for width, depth, heads, context, batch, dit_steps, repeats, preset (reduced|full).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import best_time, parse_preset
from jaxeff.hart.dit import DiT, DiTConfig, ddim_sample_jit
from jaxeff.hart.macs import dit_macs, hart_macs
from jaxeff.hart.tokenizer import HARTTokenizer, TokenizerConfig
from jaxeff.hart.transformer import HARTConfig, HARTTransformer, SampleOptions, generate_fhat_jit

PRESETS = {
    "reduced": {"width": 512, "depth": 8, "heads": 8, "context": 32, "batch": 1, "dit_steps": 20, "repeats": 2,
                "scales": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "diff_width": 256, "diff_depth": 3},
    "full": {"width": 1536, "depth": 16, "heads": 24, "context": 300, "batch": 1, "dit_steps": 20, "repeats": 5,
             "scales": (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64), "diff_width": 1024, "diff_depth": 6},
}


def main(argv):
    o = parse_preset(argv, PRESETS)
    pns = o["scales"]
    hcfg = HARTConfig(embed_dim=o["width"], depth=o["depth"], num_heads=o["heads"], context_token=o["context"],
                      context_dim=o["width"], patch_nums=pns, diff_width=o["diff_width"], diff_depth=o["diff_depth"])
    tcfg = TokenizerConfig(patch_nums=pns, ch=32, ch_mult=(1, 1), num_res_blocks=1)  # only the quantizer is used
    latent = pns[-1] * 2  # f8 latent of the same image size as HART's f16 latent
    dcfg = DiTConfig(hidden=o["width"], depth=o["depth"], num_heads=o["heads"], latent_size=latent,
                     context_token=o["context"], context_dim=o["width"])
    b = o["batch"]
    ctx = jax.random.normal(jax.random.key(0), (b, o["context"], o["width"]))
    pos = jnp.broadcast_to(jnp.arange(o["context"]), (b, o["context"]))
    hart = nnx.split((HARTTransformer(hcfg, rngs=nnx.Rngs(0)), HARTTokenizer(tcfg, rngs=nnx.Rngs(1)).quantize))
    dit = nnx.split(DiT(dcfg, rngs=nnx.Rngs(2)))
    opts = SampleOptions(cfg=4.5)
    key, reps = jax.random.key(1), o["repeats"]
    t_hart = best_time(lambda: generate_fhat_jit(*hart, ctx, pos, key, opts), repeats=reps) / b
    t_dit = best_time(lambda: ddim_sample_jit(*dit, ctx, key, steps=o["dit_steps"]), repeats=reps) / b
    m_h, m_d = hart_macs(hcfg)["total"], dit_macs(dcfg, steps=o["dit_steps"])["total"]
    dev = jax.devices()[0].device_kind
    print(f"HART vs DiT ({pns[-1] * 16}px, width {o['width']}, depth {o['depth']}, {o['dit_steps']} DiT steps, "
          f"CFG, batch {b}, device {dev})")
    print(f"{'model':<10}{'s / image':>12}{'GMACs / image':>16}")
    print(f"{'HART':<10}{t_hart:>12.4f}{m_h / 1e9:>16.1f}")
    print(f"{'DiT':<10}{t_dit:>12.4f}{m_d / 1e9:>16.1f}")
    print(f"speed-up (DiT time / HART time): {t_dit / t_hart:.2f}x; MAC ratio (DiT / HART): {m_d / m_h:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
