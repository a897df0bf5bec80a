"""`make bench name=longvila [preset=reduced|full] [lengths=1024,4096] [devices=8] [heads=8] [kv_heads=2]
[head_dim=64] [batch=1] [sub_blocks=2] [repeats=3]`   (or `python -m benchmarks.longvila ...`; `--help`: this text)

LongVILA's systems headline (arXiv 2408.10188, text-only settings): MM-SP's 2D attention (Ulysses all-to-all
inside a node x ring attention across nodes) is 2.1-5.7x faster than ring-style sequence parallelism. This script
runs causal attention (`jaxeff.longvila.sequence_parallel_attention`, zigzag layout) side by side in one process on
the same devices, for every split (ring R, Ulysses U) of them: pure ring (R = devices), the 2D splits, and pure
Ulysses (U = devices); a split whose U does not divide the query heads is listed as skipped. For each sequence
length and split it prints:

- forward and forward+backward time (best of `repeats` after a warm-up) and the speed-up over pure ring (ring
  time / split time);
- the bytes one device sends, read from the compiled program's HLO (`jaxeff.longvila.comm.hlo_collective_bytes`:
  collective operands, `while` bodies times their trip count), forward and forward+backward, as a fraction of
  pure ring's; the analytic forward formula (`comm.analytic_attention_bytes`) beside it as a cross-check; and the
  ring's sequential K/V hops (R - 1);
- the causal work the kernel does on the slowest device relative to the ideal share (`layout.causal_work`: the
  kernel skips only fully masked sub-blocks, so coarser blocks, i.e. larger U, compute more masked pairs).

Devices: with fewer than `devices` CPU devices the script re-runs itself in a child process with
`XLA_FLAGS=--xla_force_host_platform_device_count=<devices>` (`jaxeff.longvila.devices.run_child`). Simulated CPU
devices share the host's cores and "communicate" by memory copies, so CPU times show compute and overheads of the
sharded programs, not a network: they are not the paper's effect. The byte counts hold on any backend (the CPU
backend upcasts bf16 collectives to f32, hence float32 in the reduced preset).

Presets: `reduced` (default; CPU-sized: 8 query / 2 KV heads, head dim 64, float32, 1024 and 4096 tokens) and
`full`: LLaMA-3-8B attention shapes (32 query / 8 KV heads, head dim 128), bfloat16, 32768 and 65536 tokens,
4 sub-blocks per ring block, meant for 8 GPUs on one host or a TPU host with 8 devices. `full` has not been run:
no such machine was at hand, and jaxeff's 2D attention has so far run on CPU only; its sizes come from arithmetic
(one score tile, H/U heads x (S / R / sub_blocks)^2 float32, stays under 5 GB), not from a run.
Integer options override the preset; `lengths` is a comma-separated list, each a multiple of 2 x devices.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
from tqdm import tqdm

from benchmarks import best_time, parse_preset
from jaxeff.longvila.comm import analytic_attention_bytes, hlo_collective_bytes
from jaxeff.longvila.devices import needs_reexec, run_child
from jaxeff.longvila.layout import causal_work, layout_permutation, length_multiple
from jaxeff.longvila.measure import attention_step, factorisations, random_qkv, sp_mesh

PRESETS = {
    "reduced": {"devices": 8, "batch": 1, "heads": 8, "kv_heads": 2, "head_dim": 64, "sub_blocks": 2, "repeats": 3,
                "lengths": (1024, 4096), "dtype": "float32"},
    "full": {"devices": 8, "batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128, "sub_blocks": 4, "repeats": 5,
             "lengths": (32768, 65536), "dtype": "bfloat16"},
}


def parse(argv: list[str]) -> dict:
    """Options from `argv` (`preset=`, integer overrides, `lengths=a,b,...`); SystemExit with the reason on bad
    input, and with this module's docstring for -h / --help."""
    given = [a for a in argv if a.startswith("lengths=")]
    opts = parse_preset([a for a in argv if not a.startswith("lengths=")], PRESETS, doc=__doc__)
    if given:
        try:
            opts["lengths"] = tuple(int(x) for x in given[-1].removeprefix("lengths=").split(","))
        except ValueError:
            raise SystemExit(f"lengths must be comma-separated integers, got {given[-1]!r}") from None
    small = [k for k in ("devices", "batch", "heads", "kv_heads", "head_dim", "sub_blocks", "repeats") if opts[k] < 1]
    if small or opts["devices"] < 2:
        raise SystemExit(f"{small or ['devices']} must be >= 1 (devices >= 2): {opts}")
    if opts["heads"] % opts["kv_heads"]:
        raise SystemExit(f"heads ({opts['heads']}) must be a multiple of kv_heads ({opts['kv_heads']})")
    multiple = math.lcm(*(length_multiple(r, u) for r, u in factorisations(opts["devices"])))
    bad = [s for s in opts["lengths"] if s < 1 or s % multiple]
    if bad:
        raise SystemExit(f"lengths {bad}: every length must be a positive multiple of {multiple} (the zigzag layout "
                         f"of every split of {opts['devices']} devices)")
    return opts


def measure(opts: dict, seq: int, ring: int, uly: int, devices) -> dict:
    """Times and HLO bytes of one split at one length: forward, then forward+backward."""
    b, h, hkv, d = opts["batch"], opts["heads"], opts["kv_heads"], opts["head_dim"]
    mesh = sp_mesh(ring, uly, devices)
    positions = layout_permutation(seq, ring, uly, zigzag=True)
    q, k, v = random_qkv(mesh, b, seq, h, hkv, d, jnp.dtype(opts["dtype"]))
    row = {"ring": ring, "ulysses": uly}
    for name, backward in (("fwd", False), ("fwd+bwd", True)):
        compiled = attention_step(mesh, positions, backward, opts["sub_blocks"]).lower(q, k, v).compile()
        row[f"{name} bytes"] = sum(c["wire_bytes"] for c in hlo_collective_bytes(compiled.as_text()).values())
        row[f"{name} s"] = best_time(compiled, q, k, v, repeats=opts["repeats"])
    analytic = analytic_attention_bytes(b, seq, h, hkv, d, ring, uly, dtype_bytes=jnp.dtype(opts["dtype"]).itemsize)
    row["analytic fwd bytes"] = sum(analytic.values())
    work = causal_work(positions, ring, uly, opts["sub_blocks"])
    row["work"] = work["critical_path"][0] / (work["pairs"].sum() / len(work["pairs"]))
    return row


def _mb(x: float) -> str:
    return f"{x / 1e6:.4g}"


def table(seq: int, rows: list[dict]) -> list[str]:
    ring_row = rows[0]  # factorisations() starts with pure ring, which always runs (U = 1 divides any head count)
    lines = []
    for row in rows:
        r, u = row["ring"], row["ulysses"]
        kind = "pure ring" if u == 1 else "pure Ulysses" if r == 1 else "2D"
        if "skipped" in row:
            lines.append(f"| {seq} | {kind} {r}x{u} | {r - 1} | {row['skipped']} |" + " |" * 9)
            continue
        cells = [f"{seq}", f"{kind} {r}x{u}", f"{r - 1}"]
        for name in ("fwd", "fwd+bwd"):
            cells += [f"{row[name + ' s'] * 1e3:.1f}", f"{ring_row[name + ' s'] / row[name + ' s']:.2f}x"]
        for name in ("fwd", "fwd+bwd"):
            cells += [_mb(row[name + " bytes"]), f"{row[name + ' bytes'] / ring_row[name + ' bytes']:.2f}"]
        cells += [_mb(row["analytic fwd bytes"]), f"{row['work']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str]) -> None:
    opts = parse(argv)
    n = opts["devices"]
    if needs_reexec(n):
        print(f"only {jax.device_count()} CPU device(s) here: re-running in a child process with "
              f"XLA_FLAGS=--xla_force_host_platform_device_count={n}", flush=True)
        run_child(["-m", "benchmarks.longvila", *argv], n)
        return
    if jax.device_count() < n:
        raise SystemExit(f"devices={n}, but this host has {jax.device_count()} {jax.default_backend()} device(s): "
                         f"pass devices=<a number it has>, or JAX_PLATFORMS=cpu to simulate {n} CPU devices")
    devices = jax.devices()[:n]
    kind = devices[0].device_kind
    print(f"LongVILA MM-SP 2D attention, every (ring x Ulysses) split of {n} x {kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}; B={opts['batch']}, H={opts['heads']}, H_kv={opts['kv_heads']}, D={opts['head_dim']}, "
          f"{opts['dtype']}, causal, zigzag layout, {opts['sub_blocks']} sub-blocks per ring block, best of "
          f"{opts['repeats']}")
    if jax.default_backend() == "cpu":
        print(f"CPU: the {n} simulated devices share this host's {os.cpu_count()} cores (load average "
              f"{os.getloadavg()[0]:.1f}) and exchange data by memory copies, so the times are not the paper's effect "
              "(that needs a real interconnect); the bytes are what each device would send on any backend.")
        if opts["dtype"] == "bfloat16":
            print("CPU and bfloat16: the CPU backend runs bf16 collectives in f32, so the HLO bytes here are about "
                  "twice the analytic column, which counts 2-byte elements.")
    splits = factorisations(n)
    lines = []
    with tqdm(total=len(opts["lengths"]) * len(splits), desc="compile + time", file=sys.stderr) as bar:
        for seq in opts["lengths"]:
            rows = []
            for ring, uly in splits:
                if opts["heads"] % uly:
                    rows.append({"ring": ring, "ulysses": uly,
                                 "skipped": f"skipped: U={uly} does not divide {opts['heads']} heads"})
                else:
                    rows.append(measure(opts, seq, ring, uly, devices))
                bar.update()
            lines += table(seq, rows)
    print("\n| S | split R x U | ring hops | fwd ms | fwd speed-up vs ring | fwd+bwd ms | fwd+bwd speed-up vs ring | "
          "fwd MB/device | fwd bytes / ring's | fwd+bwd MB/device | fwd+bwd bytes / ring's | analytic fwd MB | "
          "kernel work / ideal |")
    print("|---" * 13 + "|")
    print("\n".join(lines))
    print("\nspeed-up = pure ring's time / this split's (> 1: faster than ring). Bytes: what one device sends in the "
          "compiled program (all-to-all (U-1)/U of its operand, each ring hop all of it), positions included. Kernel "
          "work: (q, k) pairs in the sub-blocks the slowest device computes, summed over ring steps "
          "(`layout.causal_work`), / the ideal causal share S(S+1)/2/devices; the splits differ in it too, and on CPU, "
          "where time is mostly compute, that shows in the times. Paper: 2D attention 2.1-5.7x faster than "
          "ring-style SP on GPUs (text-only).")


if __name__ == "__main__":
    main(sys.argv[1:])
