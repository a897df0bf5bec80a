"""VCPO vs off-policy baselines under simulated asynchronous RL (lag k) on digit reversal with a small Llama.

Per method, every (k, seed) cell runs in one compiled, vmapped program (`jaxeff.vcpo.sim.run_grid`). Outputs:
reward vs step per k, ESS and grad norm vs step (log axes) with collapse marked, final greedy accuracy vs k with
seed bands, a results table, and the Monte-Carlo variance of the gradient estimator at frozen parameters for no
baseline / group mean / OPOB. Run on CPU only.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jaxeff.experiment import Run, register
from jaxeff.vcpo import sim

GRID_METHODS = ("naive", "ppo_clip", "seq_tis", "mis", "m2po", "vcpo", "vcpo_no_ess", "vcpo_no_opob")


@dataclasses.dataclass(frozen=True)
class Config:
    lags: tuple[int, ...] = (0, 4, 8, 16)
    methods: tuple[str, ...] = GRID_METHODS
    seeds: int = 3
    steps: int = 600
    eval_every: int = 50
    num_digits: int = 4
    base: int = 10
    hidden_size: int = 32
    intermediate_size: int = 64
    rope_theta: float = 20.0
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    mismatch_noise: float = 0.0
    rho_on: float = 1.0
    opob_weighting: str = "code"
    variance_batches: int = 1000
    variance_lag: int = 8
    collapse_drop: float = 0.2  # collapse: smoothed train reward falls this far below its running maximum
    smooth: int = 20

    def sim_config(self) -> sim.SimConfig:
        return sim.SimConfig(
            num_digits=self.num_digits, base=self.base, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, intermediate_size=self.intermediate_size,
            rope_theta=self.rope_theta,
            prompts_per_step=self.prompts_per_step, group_size=self.group_size, steps=self.steps,
            eval_every=self.eval_every, lr=self.lr, weight_decay=self.weight_decay, max_lag=max(self.lags),
            mismatch_noise=self.mismatch_noise, rho_on=self.rho_on, opob_weighting=self.opob_weighting)

    def validate(self):
        unknown = [m for m in self.methods if m not in sim.METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; known: {sorted(sim.METHODS)}")
        if not self.lags or min(self.lags) < 0:
            raise ValueError(f"lags must be a non-empty tuple of ints >= 0, got {self.lags}")
        if self.seeds < 1 or self.variance_batches < 2 or self.smooth < 1:
            raise ValueError("seeds >= 1, variance_batches >= 2 and smooth >= 1 required")
        self.sim_config().validate()


def collapse_step(reward: np.ndarray, drop: float, window: int) -> int | None:
    """First step where the moving-average train reward is `drop` below its running maximum, else None."""
    window = min(window, len(reward))
    smooth = np.convolve(reward, np.ones(window) / window, mode="valid")
    below = np.nonzero(smooth < np.maximum.accumulate(smooth) - drop)[0]
    return int(below[0] + window - 1) if below.size else None


def _plots(cfg: Config, run: Run, curves: dict, acc: dict, collapses: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(cfg.steps)
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(cfg.methods)}
    nk = len(cfg.lags)

    fig, axes = plt.subplots(1, nk, figsize=(4.2 * nk, 3.4), squeeze=False, sharey=True)
    for j, lag in enumerate(cfg.lags):
        ax = axes[0, j]
        for m in cfg.methods:
            r = curves[m]["reward"][j]  # [seeds, steps]
            ax.plot(steps, r.mean(0), color=colors[m], label=m, lw=1.2)
            ax.fill_between(steps, r.min(0), r.max(0), color=colors[m], alpha=0.15, lw=0)
        ax.set_title(f"k = {lag}")
        ax.set_xlabel("optimizer step")
    axes[0, 0].set_ylabel("train reward (seed mean, min-max band)")
    axes[0, -1].legend(fontsize=7)
    run.savefig(fig, "reward_vs_step.png")

    fig, axes = plt.subplots(2, nk, figsize=(4.2 * nk, 6.4), squeeze=False, sharex=True)
    for j, lag in enumerate(cfg.lags):
        for row, key in enumerate(("ess_ratio", "grad_norm")):
            ax = axes[row, j]
            for m in cfg.methods:
                x = curves[m][key][j, 0]  # seed 0
                ax.plot(steps, np.maximum(x, 1e-6), color=colors[m], label=m, lw=0.8)
                c = collapses[m][j][0]
                if c is not None:
                    ax.axvline(c, color=colors[m], ls="--", lw=0.8)
                    ax.plot([c], [max(x[c], 1e-6)], "x", color=colors[m], ms=8)
            ax.set_yscale("log")
            if key == "ess_ratio":  # keep a readable decade range when every weight is ~1 (k = 0)
                low = min(curves[m][key][j, 0].min() for m in cfg.methods)
                ax.set_ylim(min(1e-2, 0.5 * max(low, 1e-6)), 1.5)
            ax.set_title(f"k = {lag}: {key} (seed 0)")
        axes[1, j].set_xlabel("optimizer step (dashed/x: collapse)")
    axes[0, -1].legend(fontsize=7)
    run.savefig(fig, "ess_gradnorm_vs_step.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in cfg.methods:
        a = acc[m][:, :, -1]  # [lags, seeds]
        ax.plot(cfg.lags, a.mean(1), "o-", color=colors[m], label=m)
        ax.fill_between(cfg.lags, a.min(1), a.max(1), color=colors[m], alpha=0.15, lw=0)
    ax.set_xlabel("lag k (optimizer steps)")
    ax.set_ylabel("final greedy per-digit accuracy")
    ax.legend(fontsize=7)
    run.savefig(fig, "accuracy_vs_k.png")

    # Does ESS predict collapse? Min ESS over the 50 steps before collapse (or over the run if none) vs step.
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in cfg.methods:
        for j in range(nk):
            for s, c in enumerate(collapses[m][j]):
                ess = curves[m]["ess_ratio"][j, s]
                end = cfg.steps if c is None else c + 1
                x = ess[max(0, end - 50) : end].min() if c is not None else ess.min()
                marker, face = ("^", "none") if c is None else ("o", colors[m])
                ax.plot([max(x, 1e-6)], [end], marker, color=colors[m], mfc=face,
                        label=m if (j, s) == (0, 0) else None)
    ax.set_xscale("log")
    ax.set_xlabel("min ESS ratio in the 50 steps before collapse (hollow ^: no collapse, whole run)")
    ax.set_ylabel("collapse step")
    ax.legend(fontsize=7)
    run.savefig(fig, "ess_before_collapse.png")


@register("vcpo_async", Config, presets={
    "smoke": {"lags": (8,), "methods": ("seq_tis", "vcpo"), "seeds": 1, "steps": 100, "eval_every": 25,
              "prompts_per_step": 8, "variance_batches": 100},
    "full": {},
})
def run(cfg: Config, run: Run) -> None:
    """Asynchronous RL lag sweep: VCPO vs off-policy baselines (digit reversal, small Llama, CPU)."""
    scfg = cfg.sim_config()
    curves, acc, collapses, finals, wall = {}, {}, {}, {}, {}
    for m in run.progress(cfg.methods, desc="methods (each: all k x seeds in one compiled program)"):
        t0 = time.time()
        metrics, accuracy, params, behaviour = sim.run_grid(scfg, sim.METHODS[m], cfg.lags, np.arange(cfg.seeds))
        wall[m] = time.time() - t0
        curves[m], acc[m], finals[m] = metrics, accuracy, (params, behaviour)
        collapses[m] = [[collapse_step(metrics["reward"][j, s], cfg.collapse_drop, cfg.smooth)
                         for s in range(cfg.seeds)] for j in range(len(cfg.lags))]
        for j, lag in enumerate(cfg.lags):
            for step in range(0, cfg.steps, max(1, cfg.steps // 100)):
                run.log(step, method=m, lag=lag, **{k: float(v[j, :, step].mean()) for k, v in metrics.items()})
    np.savez_compressed(run.dir / "curves.npz", **{f"{m}/{k}": v for m in cfg.methods for k, v in curves[m].items()},
                        **{f"{m}/greedy_accuracy": acc[m] for m in cfg.methods}, lags=np.asarray(cfg.lags))

    rows = []
    tail = max(1, cfg.steps // 10)
    for j, lag in enumerate(cfg.lags):
        for m in cfg.methods:
            final = acc[m][j, :, -1]
            c = [x for x in collapses[m][j] if x is not None]
            rows.append({
                "k": lag, "method": m, "greedy_acc": float(final.mean()), "acc_std": float(final.std()),
                "train_reward_last10%": float(curves[m]["reward"][j, :, -tail:].mean()),
                "min_ess": float(curves[m]["ess_ratio"][j].min()),
                "max_grad_norm": float(curves[m]["grad_norm"][j].max()),
                "collapsed": f"{len(c)}/{cfg.seeds}" + (f" @{min(c)}" if c else ""),
                "wall_s_method": round(wall[m], 1),
            })
    verdicts = []
    for j, lag in enumerate(cfg.lags):
        if "vcpo" not in cfg.methods or len(cfg.methods) < 2:
            break
        final = {m: acc[m][j, :, -1] for m in cfg.methods}
        others = [m for m in cfg.methods if not m.startswith("vcpo")] or [m for m in cfg.methods if m != "vcpo"]
        best = max(others, key=lambda m: final[m].mean())
        gap = final["vcpo"].mean() - final[best].mean()
        spread = max(final["vcpo"].std(), final[best].std(), 0.02)
        word = "ties" if abs(gap) <= spread else ("wins" if gap > 0 else "loses")
        verdicts.append(f"k={lag}: VCPO {word} ({final['vcpo'].mean():.3f} vs best baseline {best} "
                        f"{final[best].mean():.3f}; tie band {spread:.3f})")
    run.results(rows, title="Final greedy accuracy (mean over seeds), stability diagnostics",
                note=("Collapse = moving-average train reward drops "
                      f"{cfg.collapse_drop} below its running max. wall_s_method: compile + all k x seeds, "
                      "this CPU.\n\n"
                      + "\n".join(f"- {v}" for v in verdicts)))

    m_ref = "vcpo" if "vcpo" in cfg.methods else cfg.methods[0]
    j = int(np.argmin([abs(lag - cfg.variance_lag) for lag in cfg.lags]))
    params, behaviour = jax.tree.map(lambda x: x[j, 0], finals[m_ref])
    tr_var = sim.gradient_variance(scfg, params, behaviour, jax.random.PRNGKey(7), cfg.variance_batches)
    run.results([{"baseline": name, "tr_var": v, "ratio_to_none": v / tr_var["none"]} for name, v in tr_var.items()],
                title=f"Monte-Carlo tr Var of the seq-TIS gradient at frozen parameters ({m_ref}, k={cfg.lags[j]}, "
                      f"seed 0, final step; {cfg.variance_batches} batches)",
                note="OPOB lowest" if min(tr_var, key=tr_var.get).startswith("opob") else "OPOB NOT lowest here")
    run.save_json("summary.json", {"rows": rows, "grad_variance": tr_var, "collapse_steps": collapses,
                                   "verdicts": verdicts})
    _plots(cfg, run, curves, acc, collapses)
