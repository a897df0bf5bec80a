"""`make bench name=dcae [resolution=512] [batch=1] [repeats=1] [model=dc-ae-f32c32-in-1.0]`

Encode / decode throughput (images/s) of DC-AE in jaxeff vs diffusers' PyTorch `AutoencoderDC` on CPU, with the
same random weights (float32), printed side by side with the ratio, plus the relative difference of the outputs.
jaxeff is timed after compilation (compile time printed separately), alternating with diffusers run by run; both
use all the CPU threads they see.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.dcae import DCAE, get_config, jit_method, torch_state


def _parse(argv: list[str]) -> dict[str, str]:
    opts = {"resolution": "512", "batch": "1", "repeats": "1", "model": "dc-ae-f32c32-in-1.0"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            raise SystemExit(f"usage: python -m benchmarks.dcae [{' '.join(k + '=' for k in opts)}]; got {arg!r}")
        opts[key] = value
    return opts


def _interleaved_best(fns, repeats: int) -> list[float]:
    """Best wall time of each fn, alternating between them so a changing machine load hits both alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main(argv: list[str]) -> None:
    import torch
    from diffusers import AutoencoderDC

    opts = _parse(argv)
    res, batch, repeats = int(opts["resolution"]), int(opts["batch"]), int(opts["repeats"])
    cfg = get_config(opts["model"])
    print(f"{opts['model']} at {res}x{res}, batch {batch}, float32, best of {repeats}; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs")

    model = DCAE.random(cfg, seed=0)
    tm = AutoencoderDC(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}).eval()
    result = tm.load_state_dict({k: torch.tensor(v) for k, v in torch_state(model).items()}, strict=False)
    if result.unexpected_keys or any(not k.endswith("num_batches_tracked") for k in result.missing_keys):
        raise RuntimeError(f"weight transfer to diffusers failed: {result}")

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)
    f = cfg.spatial_compression
    z = rng.standard_normal((batch, res // f, res // f, cfg.latent_channels)).astype(np.float32)
    xt, zt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(z).permute(0, 3, 1, 2).contiguous()

    rows = []
    for name, jfn, arg, tfn, targ in (("encode", "encode", x, lambda a: tm.encode(a).latent, xt),
                                      ("decode", "decode", z, lambda a: tm.decode(a).sample, zt)):
        start = time.perf_counter()
        fn = jit_method(model, jfn)
        out = np.asarray(fn(jnp.asarray(arg)))  # compile + first run
        first = time.perf_counter() - start
        outs = []
        with torch.inference_mode():
            jt, tt = _interleaved_best([lambda: jax.block_until_ready(fn(jnp.asarray(arg))),  # noqa: B023
                                        lambda: outs.append(tfn(targ))], repeats)  # noqa: B023
        ref = outs[-1].permute(0, 2, 3, 1).numpy()
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        rows.append((name, batch / jt, batch / tt, tt / jt, first, rel))
        print(f"  {name}: done", flush=True)

    print("\n| op | jaxeff img/s | diffusers img/s | ratio (jaxeff/diffusers) | jaxeff compile+first s | rel. diff |")
    print("|---|---|---|---|---|---|")
    for name, j, t, r, first, rel in rows:
        print(f"| {name} | {j:.3f} | {t:.3f} | {r:.2f}x | {first:.1f} | {rel:.1e} |")


if __name__ == "__main__":
    main(sys.argv[1:])
