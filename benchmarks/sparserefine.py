"""make bench name=sparserefine: dense high-res segmentation vs low-res + SparseRefine, time and FLOPs, one run.

Random weights (timing does not depend on them). The dense model is `jaxeff.sparserefine.synth.DenseSegNet`
(`width`); "low-res" runs it on the `factor`-times downsampled image and nearest-upsamples the logits;
"+ SparseRefine" adds the entropy selector, the sparse U-Net (`planes`, `reps`) on the selected pixels and the
gated ensembler. Random weights give near-uniform logits, so the selection is set directly: the pixels within
`band` px of a class boundary of a procedural scene (`synth.make_scene`), about the share an entropy selector
picks on real models; the share is printed. Static capacities per level: `bucket_capacities` of the host-side
`pyramid_counts` (as the experiment's inference path).
Prints seconds per image (best of `repeats` after a compile + warm-up call), FLOPs (XLA's count for the dense
parts; analytic, active sites only, for the sparse U-Net) and both ratios to dense high-res.

Presets: `reduced` (default, CPU: 512x512, width 32, U-Net planes 16-32-64) and `full` (1024x2048, width 64,
the official U-Net planes 32..1024 with 2 blocks per level; GPU/TPU). Overrides: key=value for height, width_px,
width, factor, band, reps, repeats.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import best_time, parse_preset
from jaxeff.sparserefine import (
    RefinerConfig,
    SparseRefiner,
    UNetConfig,
    bucket_capacities,
    pyramid_counts,
    unet_flops,
    upsample_nearest,
)
from jaxeff.sparserefine.synth import CLASSES, DenseSegNet, downsample, make_scene

PRESETS = {
    "reduced": {"height": 512, "width_px": 512, "width": 32, "factor": 4, "band": 2, "reps": 1, "repeats": 3,
                "planes": (16, 32, 64)},
    "full": {"height": 1024, "width_px": 2048, "width": 64, "factor": 2, "band": 2, "reps": 2, "repeats": 5,
             "planes": (32, 64, 128, 256, 512, 1024)},
}


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def main(argv):
    o = parse_preset(argv, PRESETS)
    h, w, f, k = o["height"], o["width_px"], o["factor"], len(CLASSES)
    image, label = make_scene(np.random.default_rng(0), h, w)
    x = jnp.asarray(image[None], jnp.float32) / 127.5 - 1
    lab = jnp.asarray(label[None].astype(np.int32))
    edge = (lab[:, 1:, :] != lab[:, :-1, :])
    edge = jnp.pad(edge, ((0, 0), (0, 1), (0, 0))) | jnp.pad(edge, ((0, 0), (1, 0), (0, 0)))
    edge_x = lab[:, :, 1:] != lab[:, :, :-1]
    edge = edge | jnp.pad(edge_x, ((0, 0), (0, 0), (0, 1))) | jnp.pad(edge_x, ((0, 0), (0, 0), (1, 0)))
    mask = jax.lax.reduce_window(edge, False, jax.lax.bitwise_or, (1, 2 * o["band"] - 1, 2 * o["band"] - 1),
                                 (1, 1, 1), "SAME")
    count = int(mask.sum())
    net = DenseSegNet(k, o["width"], rngs=nnx.Rngs(0))
    unet = UNetConfig(planes=tuple(o["planes"]), reps=o["reps"])
    caps = bucket_capacities(np.asarray(pyramid_counts(mask, unet.num_levels, unet.downsample)), mask.shape)
    rcfg = RefinerConfig(num_classes=k, unet=unet, capacity=caps[0])
    refiner = SparseRefiner(rcfg, rngs=nnx.Rngs(1))
    refiner.eval()

    dense = nnx.jit(lambda m, x: jnp.argmax(m(x), -1))

    @nnx.jit
    def low(m, x):
        return upsample_nearest(m(downsample(x, f)), (h, w))

    @nnx.jit
    def refined(m, r, x, mask):
        out = r(x, low(m, x), mask, capacities=caps)
        return jnp.argmax(out["logits/e/full"], -1), out["overflow"], out["counts"]

    _, overflow, counts = refined(net, refiner, x, mask)
    refiner.check({"overflow": overflow, "counts": counts, "mask": mask}, caps)
    gd, st = nnx.split(net)
    fl_dense = _flops(lambda x: nnx.merge(gd, st)(x), x)
    fl_low = _flops(lambda x: nnx.merge(gd, st)(downsample(x, f)), x)
    c0 = rcfg.unet.planes[0]
    fl_sparse = unet_flops(rcfg.unet, np.asarray(counts)) + 2 * count * (c0 * k + 2 * (k + 1) * 64 + 128 + 128 * k)
    t_dense = best_time(lambda: dense(net, x), repeats=o["repeats"])
    t_low = best_time(lambda: jnp.argmax(low(net, x), -1), repeats=o["repeats"])
    t_ref = best_time(lambda: refined(net, refiner, x, mask)[0], repeats=o["repeats"])
    print(f"SparseRefine benchmark, {h}x{w}, dense width {o['width']}, low-res 1/{f}, U-Net planes "
          f"{rcfg.unet.planes} x{rcfg.unet.reps}, selected {100 * count / (h * w):.1f}% of pixels "
          f"(sites per level {np.asarray(counts).tolist()}, capacities {list(caps)}), "
          f"device {jax.devices()[0].device_kind}")
    print(f"{'method':<26}{'s / image':>12}{'GFLOPs':>10}{'speed-up':>10}{'FLOPs ratio':>13}")
    for name, t, fl in (("dense high-res", t_dense, fl_dense), ("low-res", t_low, fl_low),
                        ("low-res + SparseRefine", t_ref, fl_low + fl_sparse)):
        print(f"{name:<26}{t:>12.4f}{fl / 1e9:>10.2f}{t_dense / t:>9.2f}x{fl_dense / fl:>12.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
