"""`make bench name=dcae [resolution=512] [batch=1] [repeats=1] [model=dc-ae-f32c32-in-1.0] [dtype=float32]`

Encode / decode throughput (images/s) of DC-AE in jaxeff vs diffusers' PyTorch `AutoencoderDC`, with the same
random weights, printed side by side with the ratio, plus the relative difference of the outputs. `dtype` (float32
or bfloat16) is the parameter and activation dtype of both sides. On CPU both use all the CPU threads they see; when
jax runs on a GPU and torch sees CUDA, diffusers runs on the GPU too (the header says which devices ran), each with
its library's default conv/matmul precision; jaxeff's linear attention runs in float32 as diffusers' does
(`fp32_attention=True`; the official bfloat16 matmuls are DC-AE's default elsewhere). jaxeff is timed after
compilation (compile time printed separately), alternating with diffusers run by run; inputs sit on the device before
the clock starts, and GPU work is waited for before it stops.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.dcae import DCAE, get_config, jit_method, torch_state

_DTYPES = ("float32", "bfloat16")


def _parse(argv: list[str]) -> dict[str, str]:
    opts = {"resolution": "512", "batch": "1", "repeats": "1", "model": "dc-ae-f32c32-in-1.0", "dtype": "float32"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            raise SystemExit(f"usage: python -m benchmarks.dcae [{' '.join(k + '=' for k in opts)}]; got {arg!r}")
        opts[key] = value
    if opts["dtype"] not in _DTYPES:
        raise SystemExit(f"dtype={opts['dtype']!r}: choose one of {', '.join(_DTYPES)}")
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
    opts = _parse(argv)
    try:
        import torch
        from diffusers import AutoencoderDC
    except ImportError as e:
        raise SystemExit(f"benchmarks.dcae compares against diffusers' PyTorch AutoencoderDC and needs torch and "
                         f"diffusers (`make install-ref` or pip install -r requirements-ref.txt): {e}") from e

    res, batch, repeats = int(opts["resolution"]), int(opts["batch"]), int(opts["repeats"])
    cfg = get_config(opts["model"])
    jdtype, tdtype = getattr(jnp, opts["dtype"]), getattr(torch, opts["dtype"])
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    tdev = torch.device("cuda" if on_gpu else "cpu")
    tside = f"cuda ({torch.cuda.get_device_name()})" if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{opts['model']} at {res}x{res}, batch {batch}, {opts['dtype']}, best of {repeats}; "
          f"jaxeff on jax {jax.__version__} {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"diffusers on torch {torch.__version__} {tside}; {os.cpu_count()} CPUs")

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    # the same work as diffusers' AutoencoderDC, whose linear attention is float32 for every dtype
    model = DCAE.random(cfg, seed=0, dtype=jdtype, fp32_attention=True)
    tm = AutoencoderDC(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}).eval()
    state = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in torch_state(model).items()}
    result = tm.load_state_dict(state, strict=False)
    if result.unexpected_keys or any(not k.endswith("num_batches_tracked") for k in result.missing_keys):
        raise RuntimeError(f"weight transfer to diffusers failed: {result}")
    tm = tm.to(device=tdev, dtype=tdtype)  # the jaxeff weights are already in dtype: both round the same float32s

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)
    f = cfg.spatial_compression
    z = rng.standard_normal((batch, res // f, res // f, cfg.latent_channels)).astype(np.float32)

    def to_torch(a):
        return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().to(device=tdev, dtype=tdtype)

    rows = []
    for name, jfn, arg, tfn in (("encode", "encode", x, lambda a: tm.encode(a).latent),
                                ("decode", "decode", z, lambda a: tm.decode(a).sample)):
        ja, ta = jax.block_until_ready(jnp.asarray(arg, jdtype)), to_torch(arg)
        start = time.perf_counter()
        fn = jit_method(model, jfn)
        out = np.asarray(fn(ja), np.float32)  # compile + first run
        first = time.perf_counter() - start
        outs = []

        def run_torch():
            outs.append(tfn(ta))  # noqa: B023
            sync()

        with torch.inference_mode():
            run_torch()  # warm-up (cuDNN / oneDNN algorithm selection)
            jt, tt = _interleaved_best([lambda: jax.block_until_ready(fn(ja)), run_torch], repeats)  # noqa: B023
        ref = outs[-1].float().permute(0, 2, 3, 1).cpu().numpy()
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        rows.append((name, batch / jt, batch / tt, tt / jt, first, rel))
        print(f"  {name}: done", flush=True)

    print("\n| op | jaxeff img/s | diffusers img/s | ratio (jaxeff/diffusers) | jaxeff compile+first s | rel. diff |")
    print("|---|---|---|---|---|---|")
    for name, j, t, r, first, rel in rows:
        print(f"| {name} | {j:.3f} | {t:.3f} | {r:.2f}x | {first:.1f} | {rel:.1e} |")


if __name__ == "__main__":
    main(sys.argv[1:])
