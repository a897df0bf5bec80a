"""LongVILA MM-SP: exactness, communication volume and causal load balance of 2D (ring x Ulysses) attention.

Sections (every factorisation ring x ulysses of the device count):
1. Exactness: 2D attention output vs `jaxeff.nn.attention`, and the tiny video VLM's MM-SP loss and gradients
   (uneven frame count, variable lengths, KV heads < Ulysses degree) vs the unsplit single-device model.
2. Communication bytes per attention layer per device, read from the compiled HLO (collective operand sizes,
   `while` bodies times their trip count) next to the analytic formula (`jaxeff.longvila.comm`), forward and
   forward+backward; plus the analytic numbers for a LLaMA-3-8B-like layer at 256k tokens on 4 x 8 GPUs.
3. Causal work per device (max / mean) for contiguous vs zigzag layouts: ideal visible pairs, pairs in the
   sub-blocks the kernel computes, and the synchronous ring's critical path.
4. Section "throughput" (in the `full` preset): tokens/s of forward+backward 2D attention vs ring-only and Ulysses-only
   on the host's mesh; on CPU the section runs but its timings are not reported (simulated devices share cores).

Devices: on a CPU-only host with fewer than 8 devices the body re-runs itself in a child process with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (`jaxeff.longvila.devices`). Run on CPU only so far: 8 CPU
devices in one process (tests/multidevice/test_longvila_experiments.py); 2 processes x 4 CPU devices on one machine
(by hand, tiny sizes, all four sections: exact on both factorisations, throughput's 2D point ring 2 across the
processes x Ulysses 4 inside each). Every process builds the same inputs; process 0 writes.

    make exp name=longvila_mmsp preset=smoke

Multi-host (`full`): start the same command on every host; `jaxeff.distributed.maybe_initialize()` (called by the
runner) joins the processes. The throughput mesh puts the Ulysses axis inside a host (all-to-all over NVLink/ICI)
and the ring axis across hosts.
- Cloud TPU pod slice: `gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command="cd jaxeff &&
  .venv/bin/python -m jaxeff.run name=longvila_mmsp preset=full"`.
- Slurm GPU cluster: `srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 .venv/bin/python -m jaxeff.run
  name=longvila_mmsp preset=full` (or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID per host).
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.experiment import Run, register
from jaxeff.longvila.attention import kv_repeat_factor
from jaxeff.longvila.comm import analytic_attention_bytes, hlo_collective_bytes
from jaxeff.longvila.devices import run_on_devices
from jaxeff.longvila.layout import causal_work, layout_permutation, padded_length
from jaxeff.longvila.measure import attention_step, factorisations, random_qkv, sp_mesh
from jaxeff.longvila.vlm import MMSPConfig, VideoVLM, make_mmsp_loss, random_batch, tiny_config, unsplit_loss
from jaxeff.nn import attention

SECTIONS = ("exactness", "comm", "balance", "throughput")


@dataclasses.dataclass(frozen=True)
class Config:
    devices: int = 8
    ulysses_degrees: tuple[int, ...] = ()  # factorisations to run, by Ulysses degree; () = all
    sections: tuple[str, ...] = ("exactness", "comm", "balance")  # + "throughput" (full preset)
    # communication measurement (compile only)
    comm_batch: int = 1
    comm_seq: int = 4096
    comm_heads: int = 8
    comm_kv_heads: int = 2
    comm_head_dim: int = 64
    comm_dtype: str = "float32"  # the CPU backend upcasts bf16 collectives to f32, so CPU measures in f32
    # causal balance
    balance_seq: int = 4096
    # throughput (full preset)
    thr_batch: int = 1
    thr_seq: int = 32768
    thr_heads: int = 32
    thr_kv_heads: int = 8
    thr_head_dim: int = 128
    thr_iters: int = 5
    seed: int = 0

    def validate(self):
        if self.devices < 1:
            raise ValueError("devices must be >= 1")
        bad = [u for u in self.ulysses_degrees if u < 1 or self.devices % u]
        if bad:
            raise ValueError(f"ulysses_degrees {bad} do not divide devices={self.devices}")
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
        if self.comm_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"comm_dtype must be float32 or bfloat16, got {self.comm_dtype!r}")
        if self.comm_seq % (2 * self.devices) or self.thr_seq % (2 * self.devices):
            raise ValueError(f"comm_seq and thr_seq must be multiples of 2 x devices = {2 * self.devices}")


@register("longvila_mmsp", Config, presets={
    "smoke": {},
    "full": {"comm_dtype": "bfloat16", "comm_seq": 262144, "comm_heads": 32, "comm_kv_heads": 8,
             "comm_head_dim": 128, "balance_seq": 16384, "sections": SECTIONS},
})
def run(cfg: Config, run: Run) -> None:
    """MM-SP exactness, communication bytes and causal balance per (ring, ulysses) factorisation."""
    run_on_devices(body, cfg, run, cfg.devices)


def body(cfg: Config, run: Run) -> None:
    devices = jax.devices()[:cfg.devices]
    if len(devices) < cfg.devices:
        raise ValueError(f"{cfg.devices} devices requested, {len(devices)} available")
    facts = [(r, u) for r, u in factorisations(cfg.devices) if not cfg.ulysses_degrees or u in cfg.ulysses_degrees]
    if "exactness" in cfg.sections:
        exactness(cfg, run, facts, devices)
    if "comm" in cfg.sections:
        communication(cfg, run, facts, devices)
    if "balance" in cfg.sections:
        balance(cfg, run, facts)
    if "throughput" in cfg.sections:
        throughput(cfg, run)


def exactness(cfg: Config, run: Run, facts, devices) -> None:
    vcfg = tiny_config()
    graphdef, state = nnx.split(VideoVLM(vcfg, rngs=nnx.Rngs(cfg.seed)))
    # 2 videos: 7 and 4 frames (14 frames, not a multiple of the device count), 5 and 2 text tokens.
    batch = random_batch(vcfg, num_frames=[7, 4], text_len=[5, 2], seed=cfg.seed)
    unsplit = lambda s: unsplit_loss(nnx.merge(graphdef, s), batch)
    (ref_loss, ref_stats), ref_grads = jax.jit(jax.value_and_grad(unsplit, has_aux=True))(state)
    ks = jax.random.split(jax.random.key(cfg.seed), 3)
    b, s, h, hkv, d = 2, 64, 8, 2, 16
    q, k, v = (jax.random.normal(key, (b, s, heads, d)) for key, heads in zip(ks, (h, hkv, hkv)))
    ref_attn = attention(q, k, v, causal=True, implementation="xla")
    rows = []
    for ring, uly in run.progress(facts, desc="exactness"):
        mesh = sp_mesh(ring, uly, devices)
        perm = layout_permutation(s, ring, uly, zigzag=True)
        out = attention_step(mesh, perm)(q[:, perm], k[:, perm], v[:, perm])
        loss_fn = make_mmsp_loss(graphdef, mesh, MMSPConfig())
        (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state, batch)
        grad_diff = max(jax.tree.leaves(jax.tree.map(lambda a, r: float(jnp.max(jnp.abs(a - r))), grads, ref_grads)))
        loss_rel = abs(float(loss) / float(ref_loss) - 1)
        attn_diff = float(jnp.max(jnp.abs(out - ref_attn[:, perm])))
        rows.append({"ring": ring, "ulysses": uly, "kv_repeat": kv_repeat_factor(h, hkv, uly),
                     "llm_seq_padded": padded_length(vcfg.visual_tokens(7) + 5, ring, uly),
                     "attn_max_abs_diff": attn_diff, "loss": float(loss), "loss_rel_diff": loss_rel,
                     "max_grad_diff": grad_diff, "targets": int(stats["count"]),
                     "exact": loss_rel < 1e-6 and grad_diff < 1e-4 and attn_diff < 1e-5})
    run.results(rows, title="Exactness vs the unsplit model (float32)",
                note=f"Unsplit reference: each video alone, unpadded, one device, the decoder's own attention; loss "
                     f"{float(ref_loss):.7g} over {int(ref_stats['count'])} targets. Attention: B={b}, S={s}, "
                     f"H={h}, H_kv={hkv}, zigzag layout, vs jaxeff.nn.attention. exact = rel loss diff < 1e-6, max "
                     "grad diff < 1e-4, attention diff < 1e-5.")


def _comm_inputs(batch, seq, heads, kv_heads, head_dim, dtype):
    q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), dtype)
    return q, kv


def communication(cfg: Config, run: Run, facts, devices) -> None:
    dtype = jnp.dtype(cfg.comm_dtype)
    shape = (cfg.comm_batch, cfg.comm_seq, cfg.comm_heads, cfg.comm_kv_heads, cfg.comm_head_dim)
    q, kv = _comm_inputs(*shape, dtype)
    rows = []
    for ring, uly in run.progress(facts, desc="comm"):
        if cfg.comm_heads % uly:
            continue
        mesh = sp_mesh(ring, uly, devices)
        fwd, fwd_bwd = (hlo_collective_bytes(attention_step(mesh, backward=bwd).lower(q, kv, kv).compile().as_text())
                        for bwd in (False, True))
        ana = analytic_attention_bytes(*shape, ring, uly, dtype_bytes=dtype.itemsize)
        hlo_a2a = fwd.get("all-to-all", {}).get("wire_bytes", 0.0)
        hlo_ring = fwd.get("collective-permute", {}).get("wire_bytes", 0.0)
        hlo_total = sum(x["wire_bytes"] for x in fwd.values())
        rows.append({"ring": ring, "ulysses": uly,
                     "hlo_all_to_all_MB": hlo_a2a / 1e6, "analytic_all_to_all_MB": ana["all-to-all"] / 1e6,
                     "hlo_ring_MB": hlo_ring / 1e6, "analytic_ring_MB": ana["collective-permute"] / 1e6,
                     "hlo_total_MB": hlo_total / 1e6, "analytic_total_MB": sum(ana.values()) / 1e6,
                     "hlo_ops": " ".join(f"{k}x{v['ops']:g}" for k, v in fwd.items()),
                     "hlo_fwd+bwd_MB": sum(x["wire_bytes"] for x in fwd_bwd.values()) / 1e6,
                     "ring_steps": ring - 1})
    b, s, h, hkv, d = shape
    run.results(rows, title=f"Communication per device per attention layer (forward; wire bytes; {cfg.comm_dtype})",
                note=f"B={b}, S={s}, H={h}, H_kv={hkv}, D={d} over {cfg.devices} devices. HLO: collective "
                     "operand sizes in the compiled per-device program, `while` bodies times their trip count; wire "
                     "= what a device sends (all-to-all (U-1)/U of its operand, ppermute all of it). Totals include "
                     "the positions (int32) that travel with K/V. Analytic: `jaxeff.longvila.comm`.")
    # The paper-scale example, analytic only.
    ex = dict(batch=1, seq=262144, heads=32, kv_heads=8, head_dim=128, dtype_bytes=2)
    ex_rows = []
    for name, (ring, uly) in (("ring", (32, 1)), ("Ulysses (KV repeated to 32 heads)", (1, 32)), ("2D", (4, 8))):
        a = analytic_attention_bytes(**ex, ring=ring, ulysses=uly)
        ex_rows.append({"scheme": name, "ring": ring, "ulysses": uly, "all_to_all_MB": a["all-to-all"] / 1e6,
                        "ring_MB": a["collective-permute"] / 1e6, "sequential_ring_steps": ring - 1})
    run.results(ex_rows, title="Analytic: LLaMA-3-8B-like layer (d=4096, KV width 1024), S=262144, 32 = 4x8 GPUs, bf16",
                note="Formula only (no hardware): 2D keeps the all-to-all inside a node and cuts the inter-node "
                     "ring to 3 steps.")


def balance(cfg: Config, run: Run, facts) -> None:
    rows = []
    for ring, uly in facts:
        if ring == 1:
            continue
        s = padded_length(cfg.balance_seq, ring, uly)
        base = None
        for zigzag in (False, True):
            w = causal_work(layout_permutation(s, ring, uly, zigzag), ring, uly)
            base = base or w["critical_path"][0]
            rows.append({"ring": ring, "ulysses": uly, "layout": "zigzag" if zigzag else "contiguous",
                         "pairs_max/mean": w["pairs"].max() / w["pairs"].mean(),
                         "kernel_work_max/mean": w["executed"].max() / w["executed"].mean(),
                         "ring_critical_path_vs_contiguous": w["critical_path"][0] / base})
    run.results(rows, title=f"Causal attention work per device (S={cfg.balance_seq})",
                note="pairs: visible (query, key) pairs per device; kernel work: pairs in the 2x2 sub-blocks per ring "
                     "step that the kernel computes (fully masked sub-blocks skipped); critical path: per ring step "
                     "the slowest device's kernel work, summed over steps (the ring is synchronous). Ulysses-only "
                     "(ring=1) is balanced by construction and omitted.")


def throughput(cfg: Config, run: Run) -> None:
    """Forward+backward tokens/s for ring-only, Ulysses-only and 2D on all devices (Ulysses within a host)."""
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    n, local = len(devs), jax.local_device_count()
    candidates = {"ring-only": (n, 1), "Ulysses-only": (1, n), "2D": (n // local, local)}
    if local == n:  # one host: the 2D point is a balanced split inside it
        u = max(u for r, u in factorisations(n) if u * u <= n)
        candidates["2D"] = (n // u, u)
    shape = (cfg.thr_batch, cfg.thr_seq, cfg.thr_heads, cfg.thr_kv_heads, cfg.thr_head_dim)
    b, s, h, hkv, d = shape
    on_cpu = jax.default_backend() == "cpu"
    rows = []
    for name, (ring, uly) in run.progress(list(candidates.items()), desc="throughput"):
        if h % uly:
            rows.append({"scheme": name, "ring": ring, "ulysses": uly, "tokens_per_s": "n/a (heads % ulysses)"})
            continue
        mesh = sp_mesh(ring, uly, devs)
        perm = layout_permutation(s, ring, uly, zigzag=True)
        q, k, v = random_qkv(mesh, *shape, jnp.bfloat16, cfg.seed)
        step = attention_step(mesh, perm, backward=True)
        jax.block_until_ready(step(q, k, v))
        start = time.perf_counter()
        for _ in range(cfg.thr_iters):
            out = step(q, k, v)
        jax.block_until_ready(out)
        dt = (time.perf_counter() - start) / cfg.thr_iters
        rows.append({"scheme": name, "ring": ring, "ulysses": uly,
                     "tokens_per_s": "withheld (CPU)" if on_cpu else b * s / dt})
    if jax.process_index() == 0:
        run.results(rows, title=f"2D attention throughput, forward+backward ({jax.devices()[0].device_kind} x {n})",
                    note=f"B={b}, S={s}, H={h}, H_kv={hkv}, D={d}, bf16, zigzag layout, {cfg.thr_iters} timed steps "
                         "after one warm-up. On CPU the simulated devices share the host cores, so timings are not "
                         "reported.")
