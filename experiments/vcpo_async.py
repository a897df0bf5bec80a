"""VCPO vs off-policy baselines under simulated asynchronous RL (lag k) on digit reversal with a small Llama.

Per method, every (k, seed) cell runs in one compiled, vmapped program (`jaxeff.vcpo.sim.run_grid`). Responses
have variable length (L uniform in [min_digits, num_digits]). Outputs: reward vs step per k, ESS and grad norm vs
step (log axes) with collapse marked, final greedy accuracy vs k with seed bands, a results table, whether an
ESS / grad-norm alarm fires before each collapse, the Monte-Carlo variance of the gradient estimator at frozen
parameters for no baseline / group mean / OPOB, and a throughput model turning steps into wall-clock time
(synchronous: generation waits for the longest response, then training; asynchronous: continuous batching
overlapped with training). Run on CPU only.

Multi-process: the grid is one process-local program, so every process computes all of it (same seeds, same
numbers) and process 0 writes the run directory; nothing is sharded across processes. Run on: 1 CPU device;
2 processes x 2 CPU devices on one machine (by hand, tiny sizes: one run directory, every file written once).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jaxeff.experiment import Run, register
from jaxeff.vcpo import sim

GRID_METHODS = ("naive", "ppo_clip", "seq_tis", "mis", "m2po", "vcpo", "vcpo_no_ess", "vcpo_no_opob")


def throughput_model(rng: np.random.Generator, *, batch: int, len_mean: float, len_sigma: float, max_len: int,
                     train_cost: float, trials: int = 2000) -> dict:
    """Modelled time per optimizer step on a fixed amount of hardware, in decode steps of a full batch on all of it.
    Response lengths are log-normal with mean `len_mean` and log-std `len_sigma`, capped at `max_len`; training
    costs `train_cost` x E[L]. Synchronous (colocated): the batch waits for its longest response, E[max_i L_i],
    then trains. Asynchronous (k >= 1, as verl's fully_async: disjoint rollout and trainer pools): continuous
    batching keeps the rollout slots busy, so a batch's tokens cost E[L] of full-hardware time, and with the pools
    sized so that neither waits the step takes E[L] + training. Asynchrony thus saves the straggler time only."""
    mu = np.log(len_mean) - len_sigma**2 / 2
    lengths = np.minimum(np.ceil(rng.lognormal(mu, len_sigma, (trials, batch))), max_len)
    mean_len, max_len_batch = lengths.mean(), lengths.max(1).mean()
    train = train_cost * mean_len
    sync, async_ = max_len_batch + train, mean_len + train
    return {"E[L]": float(mean_len), "E[max L]": float(max_len_batch), "sync_step": float(sync),
            "async_step": float(async_), "speedup_per_step": float(sync / async_)}


def alarm_step(ess: np.ndarray, grad_norm: np.ndarray, ess_alarm: float, gn_alarm: float, window: int) -> int | None:
    """First step where the moving-average ESS ratio is below `ess_alarm` and the moving-average grad norm exceeds
    `gn_alarm` x its median over the first `window` steps, else None."""
    window = min(window, len(ess))
    kernel = np.ones(window) / window
    ess_s = np.convolve(ess, kernel, mode="valid")
    gn_s = np.convolve(grad_norm, kernel, mode="valid")
    hit = np.nonzero((ess_s < ess_alarm) & (gn_s > gn_alarm * np.median(grad_norm[:window])))[0]
    return int(hit[0] + window - 1) if hit.size else None


@dataclasses.dataclass(frozen=True)
class Config:
    # Defaults: the regime where naive async and seq-TIS fail at k >= 32 (jaxeff/vcpo/README.md).
    lags: tuple[int, ...] = (0, 32, 64)
    methods: tuple[str, ...] = GRID_METHODS
    seeds: int = 3
    steps: int = 400
    eval_every: int = 50
    num_digits: int = 4
    min_digits: int = 1  # response length L uniform in [min_digits, num_digits]; = num_digits for fixed length
    base: int = 10
    hidden_size: int = 32
    intermediate_size: int = 64
    rope_theta: float = 20.0
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 6e-3
    weight_decay: float = 0.0
    mismatch_noise: float = 0.0
    rho_on: float = 1.0
    opob_weighting: str = "code"
    opob_form: str = "official"
    opob_normalize_by_length: bool = False
    ess_space: str = "linear"
    variance_batches: int = 1000
    variance_lag: int = 64
    collapse_drop: float = 0.2  # collapse: smoothed train reward falls this far below its running maximum
    smooth: int = 20
    ess_alarm: float = 0.05  # alarm: smoothed ESS ratio below this and smoothed grad norm above gn_alarm x early
    gn_alarm: float = 3.0
    target_frac: float = 0.9  # wall-clock: steps until the smoothed reward reaches this fraction of sync's final
    tp_batch: int = 256  # throughput model (see `throughput_model`): an LLM-like setting
    tp_len_mean: float = 1000.0
    tp_len_sigma: float = 0.8
    tp_max_len: int = 8192
    tp_train_cost: float = 1.0

    def sim_config(self) -> sim.SimConfig:
        return sim.SimConfig(
            num_digits=self.num_digits, base=self.base, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, intermediate_size=self.intermediate_size,
            rope_theta=self.rope_theta,
            prompts_per_step=self.prompts_per_step, group_size=self.group_size, steps=self.steps,
            eval_every=self.eval_every, lr=self.lr, weight_decay=self.weight_decay, max_lag=max(self.lags),
            mismatch_noise=self.mismatch_noise, rho_on=self.rho_on, opob_weighting=self.opob_weighting,
            min_digits=self.min_digits, opob_form=self.opob_form,
            opob_normalize_by_length=self.opob_normalize_by_length, ess_space=self.ess_space)

    def validate(self):
        unknown = [m for m in self.methods if m not in sim.METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; known: {sorted(sim.METHODS)}")
        if not self.lags or min(self.lags) < 0:
            raise ValueError(f"lags must be a non-empty tuple of ints >= 0, got {self.lags}")
        if self.seeds < 1 or self.variance_batches < 2 or self.smooth < 1:
            raise ValueError("seeds >= 1, variance_batches >= 2 and smooth >= 1 required")
        if not 0 < self.target_frac <= 1 or self.tp_batch < 1 or self.tp_len_mean < 1 or self.tp_max_len < 1:
            raise ValueError("target_frac in (0, 1], tp_batch, tp_len_mean and tp_max_len >= 1 required")
        self.sim_config().validate()


def collapse_step(reward: np.ndarray, drop: float, window: int) -> int | None:
    """First step where the moving-average train reward is `drop` below its running maximum, else None."""
    window = min(window, len(reward))
    smooth = np.convolve(reward, np.ones(window) / window, mode="valid")
    below = np.nonzero(smooth < np.maximum.accumulate(smooth) - drop)[0]
    return int(below[0] + window - 1) if below.size else None


def _smoothed(x: np.ndarray, window: int) -> np.ndarray:
    window = min(window, x.shape[-1])
    return np.apply_along_axis(lambda r: np.convolve(r, np.ones(window) / window, mode="valid"), -1, x)


def _alarm_table(cfg: Config, run: Run, curves: dict, collapses: dict) -> None:
    """Per method and k: collapses, whether the ESS / grad-norm alarm fired before each, its lead, false alarms."""
    rows = []
    for m in cfg.methods:
        for j, lag in enumerate(cfg.lags):
            leads, false_alarms, missed = [], 0, 0
            for s in range(cfg.seeds):
                a = alarm_step(curves[m]["ess_ratio"][j, s], curves[m]["grad_norm"][j, s], cfg.ess_alarm,
                               cfg.gn_alarm, cfg.smooth)
                c = collapses[m][j][s]
                if c is None:
                    false_alarms += a is not None
                elif a is None or a > c:
                    missed += 1
                else:
                    leads.append(c - a)
            n_collapsed = sum(c is not None for c in collapses[m][j])
            rows.append({"method": m, "k": lag, "collapsed": f"{n_collapsed}/{cfg.seeds}",
                         "alarm_before_collapse": len(leads), "missed": missed,
                         "median_lead_steps": float(np.median(leads)) if leads else None,
                         "alarm_without_collapse": false_alarms})
    run.results(rows, title="Does ESS + grad norm predict collapse?",
                note=(f"Alarm: {cfg.smooth}-step moving-average ESS ratio < {cfg.ess_alarm} and moving-average grad "
                      f"norm > {cfg.gn_alarm} x its median over the first {cfg.smooth} steps. Lead = collapse step - "
                      "alarm step."))


def _wallclock_table(cfg: Config, run: Run, curves: dict) -> dict:
    """Steps to reach `target_frac` of the synchronous final reward, turned into modelled time."""
    tp = throughput_model(np.random.default_rng(0), batch=cfg.tp_batch, len_mean=cfg.tp_len_mean,
                          len_sigma=cfg.tp_len_sigma, max_len=cfg.tp_max_len, train_cost=cfg.tp_train_cost)
    out = {"throughput": tp}
    if 0 not in cfg.lags:
        return out
    j0, ref = cfg.lags.index(0), ("naive" if "naive" in cfg.methods else cfg.methods[0])
    sync = _smoothed(curves[ref]["reward"][j0].mean(0), cfg.smooth)
    target = cfg.target_frac * sync[-1]
    sync_steps = int(np.argmax(sync >= target)) + min(cfg.smooth, cfg.steps)
    sync_time = sync_steps * tp["sync_step"]
    rows = []
    for m in cfg.methods:
        for j, lag in enumerate(cfg.lags):
            curve = _smoothed(curves[m]["reward"][j].mean(0), cfg.smooth)
            reached = np.nonzero(curve >= target)[0]
            steps = int(reached[0]) + min(cfg.smooth, cfg.steps) if reached.size else None
            time = None if steps is None else steps * (tp["sync_step"] if lag == 0 else tp["async_step"])
            rows.append({"method": m, "k": lag, "steps_to_target": steps,
                         "time_vs_sync": None if time is None else time / sync_time,
                         "final_reward_vs_sync": float(curve[-1] / sync[-1])})
    out["rows"] = rows
    run.results(rows, title=f"Modelled wall-clock to {cfg.target_frac:.0%} of the synchronous ({ref}, k=0) final "
                            "train reward (seed mean)",
                note=(f"Throughput model: B={cfg.tp_batch}, log-normal lengths mean {cfg.tp_len_mean:g}, log-std "
                      f"{cfg.tp_len_sigma}, cap {cfg.tp_max_len}, training {cfg.tp_train_cost} x E[L]: "
                      f"E[max L] / E[L] = {tp['E[max L]'] / tp['E[L]']:.2f}, per-step speed-up of asynchrony "
                      f"{tp['speedup_per_step']:.2f}x. time_vs_sync < 1: faster than synchronous; None: never "
                      "reached."))
    return out


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
    "smoke": {"lags": (0, 32), "methods": ("naive", "vcpo"), "seeds": 1, "steps": 100, "eval_every": 25,
              "variance_batches": 100, "variance_lag": 32},
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
    run.savez("curves.npz", **{f"{m}/{k}": v for m in cfg.methods for k, v in curves[m].items()},
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
        word, spread = sim.compare(final["vcpo"], final[best])
        verdicts.append(f"k={lag}: VCPO {word} ({final['vcpo'].mean():.3f} vs best baseline {best} "
                        f"{final[best].mean():.3f}; tie band {spread:.3f})")
        if 0 in cfg.lags and "naive" in cfg.methods:
            sync = acc["naive"][cfg.lags.index(0), :, -1]
            verdicts.append(f"k={lag}: VCPO {final['vcpo'].mean():.3f} vs synchronous (naive, k=0) "
                            f"{sync.mean():.3f}: gap {final['vcpo'].mean() - sync.mean():+.3f}")
    run.results(rows, title="Final greedy accuracy (mean over seeds), stability diagnostics",
                note=("Collapse = moving-average train reward drops "
                      f"{cfg.collapse_drop} below its running max. wall_s_method: compile + all k x seeds, "
                      "this CPU.\n\n"
                      + "\n".join(f"- {v}" for v in verdicts)
                      + ("\n\nSmoke preset (100 steps, 1 seed): too short and too few seeds to separate the "
                         "methods; the README's comparison comes from the longer runs in jaxeff/vcpo/README.md "
                         "(`preset=full`)."
                         if run.preset == "smoke" else "")))

    _alarm_table(cfg, run, curves, collapses)
    wallclock = _wallclock_table(cfg, run, curves)

    m_ref = "vcpo" if "vcpo" in cfg.methods else cfg.methods[0]
    j = int(np.argmin([abs(lag - cfg.variance_lag) for lag in cfg.lags]))
    params, behaviour = jax.tree.map(lambda x: x[j, 0], finals[m_ref])
    tr_var = sim.gradient_variance(scfg, params, behaviour, jax.random.PRNGKey(7), cfg.variance_batches)
    none = tr_var["none"]  # 0 when every sampled reward is 0 (an untrained tiny run): no ratio then
    run.results([{"baseline": name, "tr_var": v, "ratio_to_none": v / none if none else None}
                 for name, v in tr_var.items()],
                title=f"Monte-Carlo tr Var of the seq-TIS gradient at frozen parameters ({m_ref}, k={cfg.lags[j]}, "
                      f"seed 0, final step; {cfg.variance_batches} batches)",
                note="OPOB lowest" if min(tr_var, key=tr_var.get).startswith("opob") else "OPOB NOT lowest here")
    run.save_json("summary.json", {"rows": rows, "grad_variance": tr_var, "collapse_steps": collapses,
                                   "verdicts": verdicts, "wallclock": wallclock})
    _plots(cfg, run, curves, acc, collapses)
