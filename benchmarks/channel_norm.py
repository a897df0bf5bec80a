"""make bench name=channel_norm: the fused Pallas channel RMS norm (+bias, +residual) and GLU gate vs XLA.

DC-AE activation sizes (batch 4 at 1024px: the 64x64x512 and 32x32x1024 EfficientViT maps, a 128x128x512 ResBlock
map), float32 and bfloat16. For each: XLA's fusion of the plain-JAX reference, and the Pallas kernel at its default
block and a few other `block_rows`, as microseconds per call and GB/s over the bytes that must move (inputs read
once, output written once). On CPU the Pallas kernels run in the interpreter, so only a GPU/TPU run says anything;
options: repeats=N, shapes=small (CPU smoke sizes, the CPU default) / dcae (the GPU/TPU default),
block_rows=default,16,64 (powers of two that are multiples of 16 are legal on both kernel flavours).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

import pallas_kernels as pk

SHAPES = {"dcae": [(4, 128, 128, 512), (4, 64, 64, 512), (4, 32, 32, 1024)], "small": [(1, 8, 8, 128)]}
GLU_SHAPES = {"dcae": [(4, 64, 64, 4096), (4, 32, 32, 8192)], "small": [(1, 8, 8, 256)]}


def per_call_us(fn, *args, repeats):
    """Best over `repeats` rounds of the mean of 20 back-to-back calls (launch overhead amortised)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(20):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / 20)
    return best * 1e6


def main(argv):
    # On CPU the kernels run in the interpreter: the DC-AE sizes take minutes there and say nothing, so CPU
    # defaults to the small shapes (shapes=dcae still runs them).
    opts = {"repeats": "5", "shapes": "dcae" if jax.default_backend() in ("gpu", "tpu") else "small",
            "block_rows": "default,16,64"}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in opts:
            raise SystemExit(f"unknown option {key!r}; options: {sorted(opts)}")
        opts[key] = value
    repeats, interpret = int(opts["repeats"]), jax.default_backend() not in ("gpu", "tpu")
    block_rows = [None if x == "default" else int(x) for x in opts["block_rows"].split(",")]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"{'Pallas in the interpreter (CPU): timings say nothing' if interpret else 'compiled Pallas'}")
    print("\n| op | shape | dtype | XLA us | Pallas us (block_rows: " + ", ".join(map(str, block_rows))
          + ") | XLA / best Pallas | Pallas GB/s |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (jnp.float32, jnp.bfloat16):
        for shape in SHAPES[opts["shapes"]]:
            ky, kr, kw, kb = jax.random.split(jax.random.key(0), 4)
            y, res = jax.random.normal(ky, shape, dtype), jax.random.normal(kr, shape, dtype)
            w, b = jax.random.normal(kw, shape[-1:]), jax.random.normal(kb, shape[-1:])
            xla = per_call_us(jax.jit(pk.channel_rms_norm_reference), y, w, b, res, repeats=repeats)
            ours = [per_call_us(jax.jit(lambda y, w, b, r, br=br: pk.channel_rms_norm(
                y, w, b, r, block_rows=br, interpret=interpret, implementation="pallas")), y, w, b, res,
                repeats=repeats) for br in block_rows]
            gbs = 3 * y.size * y.dtype.itemsize / min(ours) / 1e3
            print(f"| norm+residual | {shape} | {jnp.dtype(dtype).name} | {xla:.1f} | "
                  f"{', '.join(f'{t:.1f}' for t in ours)} | {xla / min(ours):.2f}x | {gbs:.0f} |", flush=True)
        for shape in GLU_SHAPES[opts["shapes"]]:
            y = jax.random.normal(jax.random.key(1), shape, dtype)
            xla = per_call_us(jax.jit(pk.glu_silu_reference), y, repeats=repeats)
            ours = [per_call_us(jax.jit(lambda y, br=br: pk.glu_silu(
                y, block_rows=br, interpret=interpret, implementation="pallas")), y, repeats=repeats)
                for br in block_rows]
            gbs = 1.5 * y.size * y.dtype.itemsize / min(ours) / 1e3
            print(f"| glu_silu | {shape} | {jnp.dtype(dtype).name} | {xla:.1f} | "
                  f"{', '.join(f'{t:.1f}' for t in ours)} | {xla / min(ours):.2f}x | {gbs:.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
