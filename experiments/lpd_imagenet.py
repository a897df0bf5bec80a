"""lpd_imagenet: the released LPD generator and the LlamaGen VQ-f16 tokenizer, class-conditional 256px samples in
20 parallel steps (locality-aware orders, official CFG), latency at batch 1 and throughput at a large batch next to
the paper's A100 figures (L-256 / 20 steps: 0.28 s, 139.11 img/s; bf16 there, float32 here).
`model=lpd_l_512 steps=48` (or xl) runs the 512px release with its official CFG (7.3 / 6.0) and rho = 4.

`full` downloads `hf:mit-han-lab/lpd_l_256` and `hf:FoundationVision/LlamaGen/vq_ds16_c2i.pt` (a GPU/TPU run).
`smoke` builds a tiny random model and tokenizer (no download) and only exercises the pipeline: its images are
noise and its timings mean nothing.

Multi-process: every process samples and times the same batches on its own first device (per-device latency and
throughput, nothing sharded), and process 0 writes the run directory. Run on: 1 CPU device.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from jaxeff.experiment import Run, best_time, register
from jaxeff.lpd import LPD, LPDConfig, generate, load_lpd, schedules
from jaxeff.lpd.orders import batched_orders
from jaxeff.lpd.training import cosine_group_sizes
from jaxeff.lpd.vq import VQConfig, VQModel, load_vq, to_uint8

PAPER = {("lpd_l_256", 20): (0.28, 139.11), ("lpd_xl_256", 20): (0.41, 75.20), ("lpd_xxl_256", 20): (0.55, 45.07),
         ("lpd_l_256", 32): (0.46, 110.34), ("lpd_xl_256", 32): (0.66, 61.24), ("lpd_l_512", 48): (0.69, 35.16),
         ("lpd_xl_512", 48): (1.01, 18.18)}
EVAL_CFG = {("lpd_l_256", 20): 4.8, ("lpd_xl_256", 20): 4.9, ("lpd_xxl_256", 20): 5.9, ("lpd_l_256", 32): 5.4,
            ("lpd_xl_256", 32): 5.0, ("lpd_l_512", 48): 7.3, ("lpd_xl_512", 48): 6.0}
# run_lpd_order.sh / scripts/eval: 2 for 256px, 3 for XXL / 20 steps, 4 for 512px / 48 steps
RHO = {("lpd_xxl_256", 20): 3.0, ("lpd_l_512", 48): 4.0, ("lpd_xl_512", 48): 4.0}


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "lpd_l_256"
    steps: int = 20
    random_weights: bool = False  # smoke: a tiny random model and tokenizer instead of the download
    weights_only: bool = True  # safe torch.load (takes the official args Namespace); False only for trusted files
    classes: tuple[int, ...] = (207, 360, 387, 974, 88, 979, 417, 279)
    throughput_batch: int = 64
    repeats: int = 3
    seed: int = 0

    def validate(self):
        if (self.model, self.steps) not in EVAL_CFG and not self.random_weights:
            raise ValueError(f"no official setting for {self.model} at {self.steps} steps; have {sorted(EVAL_CFG)}")
        if self.throughput_batch < 1 or self.repeats < 1 or not self.classes:
            raise ValueError("throughput_batch and repeats must be >= 1, classes non-empty")


def _models(cfg: Config):
    if cfg.random_weights:
        lpd = LPD(LPDConfig(dim=64, depth=2, num_heads=4, vocab_size=64, num_classes=1000, grid_size=4,
                            proj_dropout=0.0), rngs=nnx.Rngs(cfg.seed))
        vq = VQModel(VQConfig(codebook_size=64, ch=32, ch_mult=(1, 1, 1), z_channels=32), rngs=nnx.Rngs(cfg.seed))
        return lpd, vq
    lpd = load_lpd(f"hf:mit-han-lab/{cfg.model}", weights_only=cfg.weights_only, proj_dropout=0.0)
    return lpd, load_vq("hf:FoundationVision/LlamaGen/vq_ds16_c2i.pt", weights_only=cfg.weights_only)


@register("lpd_imagenet", Config, presets={
    "smoke": {"random_weights": True, "steps": 4, "throughput_batch": 4, "repeats": 1, "classes": (1, 2)},
    "full": {},
}, description="released LPD-L-256 + LlamaGen VQ: 20-step class-conditional samples, latency and throughput")
def run(cfg: Config, run: Run) -> None:
    import matplotlib.pyplot as plt

    lpd, vq = _models(cfg)
    lpd.eval()
    grid, n = lpd.config.grid_size, lpd.config.num_tokens
    key = (cfg.model, cfg.steps)
    sizes = cosine_group_sizes(n, cfg.steps) if cfg.random_weights else schedules.group_sizes(16 * grid, cfg.steps)
    guidance = EVAL_CFG.get(key, 4.0)
    locality = dict(proximity_threshold=1.0, repulsion_threshold=RHO.get(key, 2.0))
    decode = nnx.jit(lambda m, t: to_uint8(m.decode_code(t)))

    def sample(labels, seed):
        orders = batched_orders("locality", len(labels), grid, sizes, seed=seed, **locality)
        out = generate(lpd, sizes, orders, np.asarray(labels), cfg=guidance, key=jax.random.key(seed))
        return decode(vq, out["tokens"].reshape(len(labels), grid, grid))

    images = np.asarray(sample(cfg.classes, cfg.seed))
    fig, axes = plt.subplots(1, len(images), figsize=(2 * len(images), 2.2))
    for ax, im, c in zip(np.atleast_1d(axes), images, cfg.classes):
        ax.imshow(im)
        ax.set_title(str(c))
        ax.axis("off")
    run.savefig(fig, "samples.png")

    # orders are built before timing: officially they are precomputed offline
    labels1 = np.asarray(cfg.classes[:1])
    orders1 = batched_orders("locality", 1, grid, sizes, seed=cfg.seed, **locality)
    lat = best_time(lambda: decode(vq, generate(lpd, sizes, orders1, labels1, cfg=guidance, key=jax.random.key(0))[
        "tokens"].reshape(1, grid, grid)), repeats=cfg.repeats)
    b = cfg.throughput_batch
    labels_b = np.resize(np.asarray(cfg.classes), b)
    orders_b = batched_orders("locality", b, grid, sizes, seed=cfg.seed + 1, **locality)
    tput = b / best_time(lambda: decode(vq, generate(lpd, sizes, orders_b, labels_b, cfg=guidance,
                                                     key=jax.random.key(1))["tokens"].reshape(b, grid, grid)),
                         repeats=cfg.repeats)
    paper = PAPER.get(key, (None, None))
    run.results([{"model": cfg.model if not cfg.random_weights else "tiny random (smoke)", "steps": cfg.steps,
                  "cfg": guidance, "latency s (batch 1)": lat, "paper latency s": paper[0],
                  f"img/s (batch {b})": tput, "paper img/s (batch 64)": paper[1]}],
                title=f"{vq.config.factor * grid}px generation, {cfg.steps} steps, "
                      f"device {jax.devices()[0].device_kind}",
                note="Tokens + VQ decode, float32, orders precomputed (officially they are generated offline). "
                     "Paper: A100, bf16.")
