"""hart_1024: HART at 1024px.

- By default `ckpt=hf:mit-han-lab/hart-0.7b-1024px text_encoder=hf:mit-han-lab/Qwen2-VL-1.5B-Instruct` (downloaded
  once into the Hugging Face cache; local directories work too): generate 1024x1024 PNGs for the prompts (HART's
  default prompt list otherwise; only its first prompt for the smoke preset on a CPU) on whatever device is
  there, a grid, and latency / images-per-second / MACs in results.md.
- Offline (the download fails and nothing is cached), or with `ckpt=none text_encoder=none`, it says so and runs
  without weights: the full-size 1024px architecture with abstract (unallocated) random weights for the parameter
  table and MAC count, next to a DiT-style diffusion baseline of the same width at 1024px (20 steps, CFG); then
  the `hart_tiny` pipeline (trained here), whose images come from the tiny model, not the 1024px one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.experiment import Run, image_grid, register
from jaxeff.hart.dit import DiT, DiTConfig
from jaxeff.hart.macs import dit_macs, hart_macs, param_count
from jaxeff.hart.tiny import TINY_PRESETS, TinyConfig, run_tiny
from jaxeff.hart.tokenizer import HARTTokenizer, TokenizerConfig
from jaxeff.hart.transformer import HARTConfig, HARTTransformer, SampleOptions
from jaxeff.io import hub

# A subset of HART's `default_prompts` (hart/utils/constants.py).
DEFAULT_PROMPTS = (
    "A 4k dslr image of a lemur wearing a red magician hat and a blue coat performing magic tricks with cards in a "
    "garden.",
    "Crocodile in a sweater.",
    "an astronaut sitting in a diner, eating fries, cinematic, analog film",
    "3d digital art of an adorable ghost, glowing within, holding a heart shaped pumpkin, Halloween, super cute, "
    "spooky haunted house background.",
)


@dataclasses.dataclass(frozen=True)
class Config:
    ckpt: str | None = "hf:mit-han-lab/hart-0.7b-1024px"
    text_encoder: str | None = "hf:mit-han-lab/Qwen2-VL-1.5B-Instruct"
    prompts: tuple[str, ...] = ()
    seed: int = 1
    cfg: float = 4.5
    more_smooth: bool = True
    num_maskgit_iters: int = 1  # MAR iterations of the last scale (1: the released default, all tokens at once)
    batch: int = 0  # prompts per call; 0: the largest that fits the device (HART.max_batch; 1 on CPU)
    dtype: str = "bfloat16"  # transformer + text encoder compute / weights (float32 norms, softmax, sampler)
    timed_runs: int = 3
    dit_steps: int = 20
    xla_check: bool = False  # cross-check the analytic MACs with XLA's cost analysis of the 1024px programs
    run_tiny: bool = True

    def validate(self):
        if (self.ckpt is None) != (self.text_encoder is None):
            raise ValueError("give both ckpt= and text_encoder=, or ckpt=none text_encoder=none for the no-weights "
                             "run")
        for p in (self.ckpt, self.text_encoder):
            if p is not None and hub.is_hub_name(p):
                hub.parse(p)  # a malformed name fails here; the download happens in the run
            elif p is not None and not Path(p).is_dir():
                raise FileNotFoundError(f"{p} is not a directory")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.batch < 0 or self.timed_runs < 1 or self.dit_steps < 1 or self.num_maskgit_iters < 1:
            raise ValueError("timed_runs, dit_steps and num_maskgit_iters must be >= 1 and batch >= 0")


def _xla_macs(fn, *abstract_args) -> float:
    ca = jax.jit(fn).lower(*abstract_args).cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    return float(ca["flops"]) / 2


def _architecture(cfg: Config, run: Run):
    hcfg, tcfg = HARTConfig(), TokenizerConfig()
    dcfg = DiTConfig(hidden=hcfg.embed_dim, depth=hcfg.depth, num_heads=hcfg.num_heads,
                     context_token=hcfg.context_token, context_dim=hcfg.context_dim)
    model = nnx.eval_shape(lambda: HARTTransformer(hcfg, rngs=nnx.Rngs(0)))
    tok = nnx.eval_shape(lambda: HARTTokenizer(tcfg, rngs=nnx.Rngs(0)))
    dit = nnx.eval_shape(lambda: DiT(dcfg, rngs=nnx.Rngs(0)))
    p_diff = param_count(nnx.state(model.diffloss))
    p_tr = param_count(nnx.state(model)) - p_diff
    hm, dm = hart_macs(hcfg), dit_macs(dcfg, steps=cfg.dit_steps)
    dec = nnx.split(tok.decoder)
    z = jax.ShapeDtypeStruct((1, 64, 64, tcfg.z_channels), jnp.float32)
    dec_macs = _xla_macs(lambda s, z: nnx.merge(dec[0], s)(z), dec[1], z)
    rows = [
        {"model": "HART transformer (AR, KV cache)", "params M": p_tr / 1e6, "TMACs / image": hm["transformer"] / 1e12
         + hm["head"] / 1e12 + hm["other"] / 1e12},
        {"model": "HART residual diffusion head (8 steps)", "params M": p_diff / 1e6,
         "TMACs / image": hm["diffusion"] / 1e12},
        {"model": "HART total (excl. tokenizer decoder)", "params M": (p_tr + p_diff) / 1e6,
         "TMACs / image": hm["total"] / 1e12},
        {"model": f"DiT baseline, same width ({cfg.dit_steps} steps, CFG)",
         "params M": param_count(nnx.state(dit)) / 1e6, "TMACs / image": dm["total"] / 1e12},
        {"model": "tokenizer decoder (once per image; XLA flops/2)", "params M":
         param_count(nnx.state(tok.decoder)) / 1e6, "TMACs / image": dec_macs / 1e12},
    ]
    note = (f"1024px, batch 1, classifier-free guidance on (doubled batch) for both. HART: {len(hcfg.patch_nums)} "
            f"scales {hcfg.patch_nums} ({hcfg.num_image_tokens} image tokens, {hcfg.seq_len}-token sequence with "
            f"{hcfg.context_token} text tokens), C={hcfg.embed_dim}, depth {hcfg.depth}, {hcfg.num_heads} heads "
            f"(C, depth, heads inferred from the ~732M parameter count; the loader reads them from llm/config.json). "
            f"DiT: f8 latent 128x128x4, patch 2 -> {dcfg.num_patches} tokens + {dcfg.context_token} text tokens. "
            f"Analytic MACs (matmuls only); **DiT / HART MAC ratio: {dm['total'] / hm['total']:.1f}x** "
            "(paper: 6.9-13.4x fewer MACs). Text encoder excluded. Weights are abstract (nnx.eval_shape): nothing "
            "is allocated.")
    run.results(rows, title="hart_1024 (no weights): full-size architecture, parameters and MACs", note=note)
    if cfg.xla_check:
        gd, st = nnx.split((model, tok.quantize))
        ctx = jax.ShapeDtypeStruct((1, hcfg.context_token, hcfg.context_dim), jnp.float32)
        pos = jax.ShapeDtypeStruct((1, hcfg.context_token), jnp.int32)
        from jaxeff.hart.transformer import generate_fhat

        x_h = _xla_macs(lambda s, c, p: (lambda m: generate_fhat(m[0], m[1], c, p, jax.random.key(0),
                                                                  SampleOptions()))(nnx.merge(gd, s)), st, ctx, pos)
        run.results([{"program": "HART generate_fhat (1024px)", "analytic TMACs": hm["total"] / 1e12,
                      "XLA flops/2 (T)": x_h / 1e12}], title="hart_1024: analytic vs XLA cost analysis")
    return hm, dm


def _auto_batch(hart, opts: SampleOptions, n_prompts: int, run: Run) -> int:
    """The largest batch (<= the number of prompts) whose compiled program fits the device's memory; 1 where the
    device reports no limit (CPU) or nothing fits."""
    if not (jax.devices()[0].memory_stats() or {}).get("bytes_limit"):
        return 1
    b = hart.max_batch(opts=opts, limit=n_prompts)
    run.print(f"hart_1024: batch {max(b, 1)} (largest that fits {jax.devices()[0].device_kind} by the compiled "
              f"program's memory analysis{'; even batch 1 does not fit' if b == 0 else ''})")
    return max(b, 1)


def _with_weights(cfg: Config, run: Run, ckpt: Path, text_encoder: Path):
    from jaxeff.hart import HART

    hart = HART.from_pretrained(ckpt, text_encoder=text_encoder, dtype=jnp.dtype(cfg.dtype))
    prompts = list(cfg.prompts or DEFAULT_PROMPTS)
    if not cfg.prompts and run.preset == "smoke" and jax.default_backend() == "cpu":
        prompts = prompts[:1]  # a 1024px image takes minutes on a CPU: one default prompt unless prompts= is given
        run.print("hart_1024: smoke preset on a CPU: one default prompt (pass prompts=... for more)")
    opts = SampleOptions(cfg=cfg.cfg, more_smooth=cfg.more_smooth, num_maskgit_iters=cfg.num_maskgit_iters)
    batch = cfg.batch or _auto_batch(hart, opts, len(prompts), run)
    out_dir = run.dir / "images"
    from PIL import Image

    t0 = time.time()
    padded = prompts[:batch] + prompts[-1:] * (batch - len(prompts[:batch]))
    jax.block_until_ready(hart.generate(padded, seed=cfg.seed, opts=opts))
    compile_s = time.time() - t0
    images, times = [], []
    for rep in run.progress(range(cfg.timed_runs), desc="generate"):
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            padded = chunk + chunk[-1:] * (batch - len(chunk))  # one batch shape: no recompilation
            t = time.time()
            # prompt encoding is inside the timed region, as in the reference latency_profile.py
            imgs = np.asarray(hart.generate(padded, seed=cfg.seed + i, opts=opts))[: len(chunk)]
            times.append((time.time() - t, len(chunk)))
            if rep == 0:
                images.extend(imgs)
    if run.is_main:  # every process computed the same images; only process 0 writes files
        out_dir.mkdir()
        for j, im in enumerate(images):
            Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)).save(out_dir / f"{j:04d}.png")
        (run.dir / "prompts.txt").write_text("\n".join(prompts))
    run.savefig(image_grid(np.clip(images, 0, 1), 1, len(images)), "grid.png")
    total_t, total_n = sum(t for t, _ in times), sum(n for _, n in times)
    m = hart_macs(hart.transformer.cfg)
    run.results([{"images": len(images), "batch": batch, "latency s / batch": total_t / len(times),
                  "images / s": total_n / total_t, "first call (compile) s": compile_s,
                  "TMACs / image (analytic)": m["total"] / 1e12, "device": jax.devices()[0].device_kind}],
                title="hart_1024: generation with the released weights",
                note=(f"cfg {cfg.cfg}, more_smooth={cfg.more_smooth}, num_maskgit_iters={cfg.num_maskgit_iters}, "
                      f"dtype {cfg.dtype}, seed {cfg.seed}, {cfg.timed_runs} timed passes after one compile call; "
                      "text encoding, generation and decoding are one compiled program (only tokenisation on the "
                      "host), all timed; PNGs in images/, grid.png."))


@register("hart_1024", Config, presets={"smoke": {"timed_runs": 1}, "full": {"xla_check": True}})
def run(cfg: Config, run: Run) -> None:
    """HART 1024px: the released weights (downloaded when needed); without them (offline, or `ckpt=none`) the
    full-size MAC/param table vs DiT, then the tiny pipeline."""
    if cfg.ckpt is not None:
        try:
            ckpt, text_encoder = hub.resolve(cfg.ckpt), hub.resolve(cfg.text_encoder, allow_patterns=hub.HF_MODEL_FILES)
        except ConnectionError as e:
            run.print(f"hart_1024: no released weights ({e}); running the no-weights path instead")
            run.results([{"note": f"released weights not available: {e}"}], title="hart_1024: offline")
        else:
            _with_weights(cfg, run, ckpt, text_encoder)
            return
    _architecture(cfg, run)
    if cfg.run_tiny:
        run_tiny(TinyConfig(**TINY_PRESETS[run.preset]), run, label="hart_tiny")
        run.results([{"note": "The generated images (hart_tiny_samples.png) come from the TINY model trained here on "
                              "8x8 sklearn digits, not from the 1024px HART; no released weights were used."}],
                    title="hart_1024: images")
