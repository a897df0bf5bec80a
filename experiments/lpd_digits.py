"""lpd_digits: LPD at a scale trainable on a CPU. scikit-learn's 8x8 digits with the 17 grey levels as tokens
(N = 64, no VQ), 10 classes, 1500 train / 297 test. A small LPD decoder is trained LPD-style (a random order per
sample, a schedule drawn per step from 64/32/16/12/8 steps, label drop 0.1, the official AdamW recipe), and a
second one without mutual visibility (queries of a step do not see each other) as the ablation.

Measured:
- exact held-out NLL (bits/token) per order (raster, random, locality-aware tau=1 rho=1) and per number of steps;
  tokens of one step are sampled independently, so the parallel sampler's exact NLL is the summed cross-entropy;
- class accuracy of generated samples (logistic regression trained here on the real training digits);
- decode time per image at batch 1, K-step vs N-step, both KV-cached and compiled (median; a ratio, on CPU it
  reflects per-step dispatch and compute, not memory-boundedness).
Plots: NLL vs steps per order; sample grids per step count.

Training is data parallel over `Run.mesh` (replicated parameters and optimiser state, each global batch of
`batch` digits drawn alike on every process, each process feeding its rows; devices that `batch` does not divide
among sit out, `Run.data_mesh`); evaluation, sampling and timing then run process-locally on a copy of the trained
model, and process 0 writes. Run on: 1 CPU device; 1 process x 4 CPU devices and 2 processes x 2 CPU devices on
one machine (by hand, tiny sizes: the same training losses to 1e-7).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from jaxeff.distributed import replicate, shard_global_batch, to_local
from jaxeff.experiment import Run, call_times, image_grid, register
from jaxeff.lpd import LPD, LPDConfig, generate, schedules
from jaxeff.lpd.model import cross_entropy
from jaxeff.lpd.orders import batched_orders
from jaxeff.lpd.training import LPDOptimConfig, cosine_group_sizes, lpd_loss, make_optimizer
from jaxeff.train.step import init_train_state, make_train_step, merge

GRID, N, LEVELS = 8, 64, 17


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int = 64
    depth: int = 4
    heads: int = 4
    steps: int = 3000
    batch: int = 64
    blr: float = 4e-3  # lr = blr * batch / 256 = 1e-3 at batch 64; the toy needs more than ImageNet's blr 1e-4
    warmup: int = 100
    train_steps_choices: tuple[int, ...] = (64, 32, 16, 12, 8)
    eval_steps: tuple[int, ...] = (64, 32, 16, 12, 8, 4)
    ablation: bool = True
    sample_steps: tuple[int, ...] = (64, 12, 8)
    samples_per_class: int = 10
    cfg: float = 1.0
    timing_runs: int = 20
    seed: int = 0

    def validate(self):
        for k in ("dim", "depth", "heads", "steps", "batch", "samples_per_class", "timing_runs"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")
        if self.dim % self.heads:
            raise ValueError("dim must be divisible by heads")
        for k in self.train_steps_choices + self.eval_steps + self.sample_steps:
            if not 1 <= k <= N:
                raise ValueError(f"step counts must lie in [1, {N}], got {k}")


def digits_tokens():
    """(train tokens [1500, 64], labels, test tokens [297, 64], labels): the 0..16 grey levels, raster order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.images.reshape(-1, N).astype(np.int32), d.target.astype(np.int32)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def train(cfg: Config, run: Run, x, y, *, mutual_visibility: bool, tag: str) -> LPD:
    mcfg = LPDConfig(dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads, vocab_size=LEVELS, num_classes=10,
                     grid_size=GRID, proj_dropout=0.1)
    model = LPD(mcfg, rngs=nnx.Rngs(cfg.seed))
    model.train()
    tx = make_optimizer(LPDOptimConfig(blr=cfg.blr, batch_size=cfg.batch, warmup_steps=min(cfg.warmup, cfg.steps),
                                       total_steps=cfg.steps, cosine_steps=cfg.steps // 3, min_lr=cfg.blr / 100))
    mesh = run.data_mesh(cfg.batch)
    graphdef, state = init_train_state(model, tx, mesh=mesh)
    step = make_train_step(graphdef, lambda m, b: lpd_loss(m, b, mutual_visibility=mutual_visibility), tx)
    step_ofs = [schedules.step_of(cosine_group_sizes(N, k)) for k in cfg.train_steps_choices]
    rng = np.random.default_rng(cfg.seed)
    for i in run.progress(range(cfg.steps), desc=f"train {tag}"):
        idx = rng.integers(0, len(x), cfg.batch)
        batch = shard_global_batch({"tokens": x[idx], "labels": y[idx]}, mesh)
        batch |= replicate({"step_of": np.asarray(step_ofs[rng.integers(len(step_ofs))]),
                            "key": jax.random.key(cfg.seed * 100_003 + i)}, mesh)
        state, metrics = step(state, batch)
        if i % 50 == 0 or i == cfg.steps - 1:
            run.log(i, phase=f"train_{tag}", **{k: float(v) for k, v in metrics.items()})
    model = merge(graphdef, to_local(state))
    model.eval()
    return model


@nnx.jit(static_argnames="mutual_visibility")
def _summed_ce(model, tokens, labels, orders, step_of, mutual_visibility=True):
    logits = model(tokens, labels, orders, step_of, mutual_visibility=mutual_visibility)
    return cross_entropy(logits, tokens, orders).sum()


def held_out_bits(model: LPD, x, y, orders, sizes, *, mutual_visibility=True) -> float:
    """Exact NLL of the K-step parallel sampler, bits per token, conditional on the label."""
    ce = _summed_ce(model, x, y, orders, schedules.step_of(sizes), mutual_visibility=mutual_visibility)
    return float(ce) / (x.size * np.log(2))


def _orders(kind, batch, sizes, seed):
    return batched_orders(kind, batch, GRID, sizes, seed=seed, proximity_threshold=1.0, repulsion_threshold=1.0)


@register("lpd_digits", Config, presets={
    "smoke": {"steps": 40, "depth": 2, "dim": 32, "batch": 32, "warmup": 10, "eval_steps": (64, 8),
              "sample_steps": (8,), "samples_per_class": 2, "timing_runs": 3, "ablation": False},
    "full": {},
}, description="LPD on 8x8 digits: NLL per order and step count, mutual-visibility ablation, sample accuracy")
def run(cfg: Config, run: Run) -> None:
    import matplotlib.pyplot as plt
    from sklearn.linear_model import LogisticRegression

    x_tr, y_tr, x_te, y_te = digits_tokens()
    t0 = time.time()
    model = train(cfg, run, x_tr, y_tr, mutual_visibility=True, tag="lpd")
    train_time = time.time() - t0
    models = {"lpd": model}
    if cfg.ablation:
        models["no_mutual_visibility"] = train(cfg, run, x_tr, y_tr, mutual_visibility=False, tag="no_mv")

    # exact held-out NLL per order type and step count
    rows, curves = [], {}
    for k in cfg.eval_steps:
        sizes = cosine_group_sizes(N, k)
        row = {"steps": k}
        for kind in ("raster", "random", "locality"):
            bits = held_out_bits(model, x_te, y_te, _orders(kind, len(x_te), sizes, cfg.seed + 1), sizes)
            row[f"{kind} bits/token"] = bits
            curves.setdefault(kind, []).append(bits)
        if cfg.ablation:
            row["no-MV model, random"] = held_out_bits(models["no_mutual_visibility"], x_te, y_te,
                                                       _orders("random", len(x_te), sizes, cfg.seed + 1), sizes,
                                                       mutual_visibility=False)
            curves.setdefault("random, no mutual visibility", []).append(row["no-MV model, random"])
        rows.append(row)
    run.results(rows, title=f"Exact held-out NLL ({len(x_te)} test digits, conditional on the label)",
                note="Raster = contiguous raster chunks; locality = LPD order (tau=1, rho=1)."
                     + (" No-MV: a model trained and evaluated without mutual visibility." if cfg.ablation else ""))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, ys in curves.items():
        ax.plot(cfg.eval_steps, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("steps")
    ax.set_ylabel("held-out bits / token")
    ax.legend()
    run.savefig(fig, "nll_vs_steps.png")

    # samples: class accuracy under a classifier trained on real digits
    clf = LogisticRegression(max_iter=2000).fit(x_tr / (LEVELS - 1), y_tr)
    real_acc = float(clf.score(x_te / (LEVELS - 1), y_te))
    labels = np.repeat(np.arange(10), cfg.samples_per_class).astype(np.int32)
    srows = []
    for k in cfg.sample_steps:
        sizes = cosine_group_sizes(N, k)
        orders = _orders("locality", len(labels), sizes, cfg.seed + 2)
        out = generate(model, sizes, orders, labels, cfg=cfg.cfg, key=jax.random.key(cfg.seed + k))
        tokens = np.asarray(out["tokens"])
        srows.append({"steps": k, "class accuracy": float(clf.score(tokens / (LEVELS - 1), labels))})
        fig = image_grid(tokens.reshape(-1, GRID, GRID), 10, cfg.samples_per_class, cell=0.8, cmap="gray_r", vmin=0,
                         vmax=LEVELS - 1)
        fig.suptitle(f"{k} steps")
        run.savefig(fig, f"samples_{k}steps.png")
    run.results(srows, title="Generated samples (locality order, temperature 1)",
                note=f"Classifier accuracy on real test digits: {real_acc:.3f}.")

    # decode latency, batch 1, KV-cached and compiled
    trows, base = [], None
    for k in sorted({N, *cfg.sample_steps}, reverse=True):
        sizes = cosine_group_sizes(N, k)
        orders = _orders("raster" if k == N else "locality", 1, sizes, cfg.seed)
        sec = float(np.median(call_times(lambda s=sizes, o=orders: generate(model, s, o, [3], cfg=cfg.cfg,
                                                                              greedy=True)["tokens"],
                                         repeats=cfg.timing_runs)))
        base = base or sec
        trows.append({"steps": k, "median s/image": sec, "speed-up vs 64 steps": base / sec})
    run.results(trows, title="Decode time per image, batch 1 (KV cache, one compiled program)",
                note=f"{jax.default_backend()} backend; training took {train_time:.0f} s.")
