"""Off-policy policy-gradient losses, VCPO's ESS learning-rate scale and OPOB baseline, and diagnostics.

Everything here is a pure function of arrays (jit- and vmap-able). Shapes: `logp`, `logp_mu`, `mask` are per-token
[B, T] (log pi_theta, behaviour log mu recorded at sampling, 1 for response tokens); `adv`, `rewards`, `group_ids`
are per-sequence [B]. Every loss aggregates seq-mean-token-mean (token mean inside a sequence, then mean over
sequences) and returns `(loss, metrics)` with the same metric keys, so methods can be swapped inside one program.

Value checks (empty group, all-masked batch) run when the arrays are concrete and raise ValueError; under `jit`
the same inputs give finite values (0 where nothing is defined), never NaN. Run on CPU only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-8
LR_RULES = ("sqrt", "linear", "none")
OPOB_WEIGHTINGS = ("readme", "code")


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_token_inputs(logp, logp_mu, mask):
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T], got shape {logp.shape}")
    for name, x in (("logp_mu", logp_mu), ("mask", mask)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} shape {x.shape} does not match logp shape {logp.shape}")
    if mask is not None and _concrete(mask) and not np.any(np.asarray(mask) > 0):
        raise ValueError("mask selects no token: the batch is empty")


def _check_seq(name, x, batch):
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {x.shape}")


def token_mean(x, mask):
    """Per-sequence mean over masked tokens [B]; 0 for a sequence without tokens."""
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def seq_mean_token_mean(x, mask):
    """Mean over sequences that have tokens of the per-sequence token mean."""
    valid = (jnp.sum(mask, -1) > 0).astype(x.dtype)
    return jnp.sum(token_mean(x, mask) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def sequence_log_weights(logp, logp_mu, mask):
    """log w_i = sum_t [log pi_theta - log mu] over response tokens: [B]."""
    _check_token_inputs(logp, logp_mu, mask)
    return jnp.sum((logp - logp_mu) * mask, -1)


def ess_ratio(log_w, mask=None):
    """Kish ESS / B = (sum w)^2 / (B sum w^2) from sequence log-weights [B] (mask [B] selects sequences).

    Computed in log space relative to max(log w) so exp never overflows; 1 for equal weights, 1/B for one-hot.
    """
    if log_w.ndim != 1:
        raise ValueError(f"log_w must be [B], got shape {log_w.shape}")
    valid = jnp.ones_like(log_w) if mask is None else mask.astype(log_w.dtype)
    if valid.shape != log_w.shape:
        raise ValueError(f"mask shape {valid.shape} does not match log_w shape {log_w.shape}")
    if mask is not None and _concrete(mask) and not np.any(np.asarray(mask) > 0):
        raise ValueError("ess_ratio: mask selects no sequence")
    shifted = jnp.where(valid > 0, log_w, -jnp.inf)
    top = jnp.max(shifted)
    w = jnp.where(valid > 0, jnp.exp(log_w - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    n = jnp.sum(valid)
    return jnp.where(n > 0, jnp.sum(w) ** 2 / jnp.maximum(n * jnp.sum(w**2), EPS), 0.0)


def lr_scale(rho, rho_on=1.0, rule="sqrt"):
    """VCPO learning-rate multiplier: sqrt(min(1, rho / rho_on)) ("sqrt"), min(1, rho / rho_on) ("linear"), 1 ("none").

    Multiply the optax *update* by it (not the gradient) so Adam's normalisation and AdamW's weight decay scale too.
    """
    if rule not in LR_RULES:
        raise ValueError(f"unknown lr rule {rule!r}; rules: {LR_RULES}")
    if not rho_on > 0:
        raise ValueError(f"rho_on must be > 0, got {rho_on}")
    frac = jnp.clip(jnp.asarray(rho, jnp.float32) / rho_on, 0.0, 1.0)
    if rule == "sqrt":
        return jnp.sqrt(frac)
    if rule == "linear":
        return frac
    return jnp.ones_like(frac)


def _group_counts(group_ids, num_groups):
    if group_ids.ndim != 1 or not jnp.issubdtype(group_ids.dtype, jnp.integer):
        raise ValueError(f"group_ids must be a 1-D integer array, got {group_ids.dtype}{group_ids.shape}")
    if num_groups is None:
        if not _concrete(group_ids):
            raise ValueError("num_groups must be given when group_ids is traced (under jit/vmap)")
        num_groups = int(np.max(np.asarray(group_ids))) + 1
    if _concrete(group_ids):
        ids = np.asarray(group_ids)
        if ids.min() < 0 or ids.max() >= num_groups:
            raise ValueError(f"group_ids must lie in [0, {num_groups})")
        empty = np.nonzero(np.bincount(ids, minlength=num_groups) == 0)[0]
        if empty.size:
            raise ValueError(f"empty group(s): {empty.tolist()}")
    counts = jax.ops.segment_sum(jnp.ones(group_ids.shape, jnp.float32), group_ids, num_groups)
    return counts, num_groups


def group_stats(rewards, group_ids, num_groups=None):
    """Per-sample group mean and population std of the rewards: ([B], [B])."""
    counts, num_groups = _group_counts(group_ids, num_groups)
    _check_seq("rewards", rewards, group_ids.shape[0])
    mean = jax.ops.segment_sum(rewards, group_ids, num_groups) / jnp.maximum(counts, 1.0)
    var = jax.ops.segment_sum((rewards - mean[group_ids]) ** 2, group_ids, num_groups) / jnp.maximum(counts, 1.0)
    return mean[group_ids], jnp.sqrt(var)[group_ids]


def opob_weights(w, score_sq_norms, *, weighting="readme", clip_c=8.0):
    """OPOB weight per sample: w^2 ||s||^2 (README) or min(w, c)^2 w^2 ||s||^2 (released code, whose g_i already
    carries the truncated weight min(w, c))."""
    if weighting not in OPOB_WEIGHTINGS:
        raise ValueError(f"unknown OPOB weighting {weighting!r}; options: {OPOB_WEIGHTINGS}")
    out = w**2 * score_sq_norms
    if weighting == "code":
        out = out * jnp.minimum(w, clip_c) ** 2
    return out


def opob_baseline(rewards, w, score_sq_norms, group_ids, *, num_groups=None, weighting="readme", clip_c=8.0):
    """Off-policy optimal baseline per prompt group, returned per sample [B]:
    b*_g = sum_{i in g} W_i R_i / sum_{i in g} W_i with W_i = `opob_weights`.

    Scale-free: the weights are divided by their group maximum first, so tiny ||s||^2 (a confident policy, or
    gradients of a 1/B-scaled loss) are not swamped by an absolute epsilon the way the official `+ 1e-8` would be.
    A group whose weights are all 0 gets its reward mean (the official code returns 0 there)."""
    batch = rewards.shape[0] if rewards.ndim == 1 else -1
    _check_seq("rewards", rewards, batch)
    _check_seq("w", w, batch)
    _check_seq("score_sq_norms", score_sq_norms, batch)
    _check_seq("group_ids", group_ids, batch)
    _, num_groups = _group_counts(group_ids, num_groups)
    weights = opob_weights(w, score_sq_norms, weighting=weighting, clip_c=clip_c)
    top = jax.ops.segment_max(weights, group_ids, num_groups)
    weights = weights / jnp.where(top > 0, top, 1.0)[group_ids]
    num = jax.ops.segment_sum(weights * rewards, group_ids, num_groups)
    den = jax.ops.segment_sum(weights, group_ids, num_groups)
    counts = jax.ops.segment_sum(jnp.ones_like(rewards), group_ids, num_groups)
    mean = jax.ops.segment_sum(rewards, group_ids, num_groups) / jnp.maximum(counts, 1.0)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), mean)[group_ids]


def grpo_advantages(rewards, group_ids, *, num_groups=None, norm_by_std=True):
    """GRPO: (R - group mean) / group population std."""
    mean, std = group_stats(rewards, group_ids, num_groups)
    return (rewards - mean) / (std + 1e-6) if norm_by_std else rewards - mean


def opob_advantages(rewards, baseline, group_ids, *, num_groups=None, norm_by_std=True):
    """VCPO: (R - b*_g) / group population std (the OPOB baseline replaces GRPO's group mean)."""
    _, std = group_stats(rewards, group_ids, num_groups)
    return (rewards - baseline) / (std + 1e-6) if norm_by_std else rewards - baseline


def opo_advantages(rewards, lengths, group_ids, *, num_groups=None):
    """OPO (2505.23585): on-policy baseline b = sum l_i R_i / sum l_i per group (length l stands in for ||s||^2)."""
    _check_seq("lengths", lengths, rewards.shape[0])
    b = opob_baseline(rewards, jnp.ones_like(rewards), lengths.astype(rewards.dtype), group_ids, num_groups=num_groups)
    return rewards - b


def two_sum_gradient(per_sample_grads, rewards, baseline, group_ids, *, num_groups, group_scale=None):
    """Sum_g scale_g (G_R,g - b*_g G_S,g) with G_R,g = sum_{i in g} R_i g_i, G_S,g = sum_{i in g} g_i.

    `per_sample_grads` is a pytree whose leaves have a leading [B] axis: g_i, the gradient of sample i's loss with
    advantage 1. `baseline` is per sample [B] (constant in a group), `group_scale` per group (e.g. 1 / std).
    Equals the gradient of the loss with advantages scale_g (R_i - b*_g) without a second backward pass.
    """
    b_group = jax.ops.segment_max(baseline, group_ids, num_groups)
    scale = jnp.ones((num_groups,), rewards.dtype) if group_scale is None else group_scale

    def combine(g):
        flat = g.reshape(g.shape[0], -1)
        g_r = jax.ops.segment_sum(rewards[:, None] * flat, group_ids, num_groups)
        g_s = jax.ops.segment_sum(flat, group_ids, num_groups)
        return jnp.sum(scale[:, None] * (g_r - b_group[:, None] * g_s), 0).reshape(g.shape[1:])

    return jax.tree.map(combine, per_sample_grads)


# ----------------------------------------------------------------------------------------------------- losses
# Signature: fn(logp, logp_mu, mask, adv, *, logp_prox=None, **hyper) -> (loss, {"frac_clipped", "weight_mean"}).
# `frac_clipped` is the fraction of tokens (token methods) or sequences (sequence methods) clipped or masked.


def _out(loss, frac, weight_mean):
    return loss, {"frac_clipped": jnp.asarray(frac, jnp.float32), "weight_mean": jnp.asarray(weight_mean, jnp.float32)}


def _frac_tokens(flag, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(flag * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _prep(logp, logp_mu, mask, adv):
    _check_token_inputs(logp, logp_mu, mask)
    _check_seq("adv", adv, logp.shape[0])
    return mask.astype(logp.dtype), jax.lax.stop_gradient(logp - logp_mu)


def reinforce_loss(logp, logp_mu, mask, adv, *, logp_prox=None):
    """On-policy REINFORCE / GRPO with one step per batch (PPO ratio 1): -A * log pi. Stale data is taken as
    on-policy, which is the "naive async" baseline."""
    mask, _ = _prep(logp, logp_mu, mask, adv)
    return _out(seq_mean_token_mean(-adv[:, None] * logp, mask), 0.0, 1.0)


def ppo_clip_loss(logp, logp_mu, mask, adv, *, logp_prox=None, eps_low=0.2, eps_high=0.2):
    """PPO / GRPO clipped surrogate against the behaviour policy: -min(r A, clip(r, 1-eps, 1+eps) A), r = pi/mu."""
    mask, _ = _prep(logp, logp_mu, mask, adv)
    ratio = jnp.exp(logp - logp_mu)
    a = adv[:, None]
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_tok = -jnp.minimum(ratio * a, clipped * a)
    was_clipped = (ratio * a > clipped * a).astype(jnp.float32)
    return _out(seq_mean_token_mean(per_tok, mask), _frac_tokens(was_clipped, mask), seq_mean_token_mean(ratio, mask))


def token_tis_loss(logp, logp_mu, mask, adv, *, logp_prox=None, c=2.0):
    """Token-level truncated IS (Yao et al.; verl rollout_is=token): -sg[min(r_t, C)] A log pi."""
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    r = jnp.exp(log_r)
    weight = jnp.minimum(r, c)
    loss = seq_mean_token_mean(-weight * adv[:, None] * logp, mask)
    return _out(loss, _frac_tokens((r > c).astype(jnp.float32), mask), seq_mean_token_mean(weight, mask))


def seq_tis_loss(logp, logp_mu, mask, adv, *, logp_prox=None, c=8.0):
    """Sequence-level truncated IS: -sg[min(w_i, C)] A_i (1/|y_i|) sum_t log pi (VCPO's loss with C = 8)."""
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    w = jnp.exp(jnp.sum(log_r * mask, -1))
    weight = jnp.minimum(w, c)
    loss = jnp.mean(-weight * adv * token_mean(logp, mask))
    return _out(loss, jnp.mean((w > c).astype(jnp.float32)), jnp.mean(weight))


def token_mis_loss(logp, logp_mu, mask, adv, *, logp_prox=None, low=0.5, high=5.0):
    """Token-level masked IS (IcePop, 2510.18855): weight r_t where low <= r_t <= high, else the token is dropped."""
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    r = jnp.exp(log_r)
    keep = ((r >= low) & (r <= high)).astype(logp.dtype)
    loss = seq_mean_token_mean(-keep * r * adv[:, None] * logp, mask)
    return _out(loss, _frac_tokens(1.0 - keep, mask), seq_mean_token_mean(keep * r, mask))


def _seq_masked_is(logp, logp_mu, mask, adv, *, low, high, geometric):
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    log_w = jnp.sum(log_r * mask, -1)
    stat = token_mean(log_r, mask) if geometric else log_w
    keep = ((stat >= jnp.log(low)) & (stat <= jnp.log(high))).astype(logp.dtype)
    weight = keep * jnp.exp(log_w)
    loss = jnp.mean(-weight * adv * token_mean(logp, mask))
    return _out(loss, 1.0 - jnp.mean(keep), jnp.mean(weight))


def seq_mis_loss(logp, logp_mu, mask, adv, *, logp_prox=None, low=0.5, high=2.0):
    """Sequence-level masked IS: sequence weight w_i, the whole sequence dropped when w_i is outside [low, high]."""
    return _seq_masked_is(logp, logp_mu, mask, adv, low=low, high=high, geometric=False)


def geo_mis_loss(logp, logp_mu, mask, adv, *, logp_prox=None, low=0.999, high=1.001):
    """Geometric-mean MIS (verl rollout_rs=geometric): mask the sequence when exp(mean_t log r_t) is outside
    [low, high]; kept sequences carry their weight w_i."""
    return _seq_masked_is(logp, logp_mu, mask, adv, low=low, high=high, geometric=True)


def m2po_keep_mask(log_r, mask, tau=0.04):
    """M2PO's second-moment trust region: drop the tokens with the largest (log r)^2 until the mean (log r)^2 of the
    remaining (masked) tokens is <= tau. Returns the kept-token mask [B, T]."""
    sq = jnp.where(mask > 0, log_r**2, jnp.inf).reshape(-1)
    order = jnp.argsort(sq)
    sorted_sq = sq[order]
    count = jnp.arange(1, sq.shape[0] + 1, dtype=sq.dtype)
    prefix_mean = jnp.cumsum(jnp.where(jnp.isfinite(sorted_sq), sorted_sq, 0.0)) / count
    # Prefix means of an ascending sort are nondecreasing, so the admissible prefixes are a prefix themselves.
    n_keep = jnp.sum((prefix_mean <= tau) & jnp.isfinite(sorted_sq))
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    return ((rank < n_keep).reshape(mask.shape) & (mask > 0)).astype(log_r.dtype)


def m2po_loss(logp, logp_mu, mask, adv, *, logp_prox=None, tau=0.04):
    """M2PO (2510.01161): unclipped token IS -r_t A on the tokens kept by the second-moment constraint."""
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    keep = m2po_keep_mask(log_r, mask, tau)
    ratio = jnp.exp(logp - logp_mu)
    loss = seq_mean_token_mean(-keep * ratio * adv[:, None], mask)
    return _out(loss, _frac_tokens(1.0 - keep, mask), seq_mean_token_mean(keep * ratio, mask))


def gspo_loss(logp, logp_mu, mask, adv, *, logp_prox=None, eps_low=3e-4, eps_high=4e-4):
    """GSPO (2507.18071): s_i = (pi(y_i)/mu(y_i))^(1/|y_i|); -min(s A, clip(s, 1-eps_low, 1+eps_high) A)."""
    mask, _ = _prep(logp, logp_mu, mask, adv)
    s = jnp.exp(token_mean(logp - logp_mu, mask))
    clipped = jnp.clip(s, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.mean(-jnp.minimum(s * adv, clipped * adv))
    return _out(loss, jnp.mean((s * adv > clipped * adv).astype(jnp.float32)), jnp.mean(s))


def cispo_loss(logp, logp_mu, mask, adv, *, logp_prox=None, eps_low=1.0, eps_high=0.28):
    """CISPO (2506.13585): -sg[clip(r_t, 1-eps_low, 1+eps_high)] A log pi (eps_low = 1: no lower bound)."""
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    r = jnp.exp(log_r)
    weight = jnp.clip(r, 1.0 - eps_low, 1.0 + eps_high)
    loss = seq_mean_token_mean(-weight * adv[:, None] * logp, mask)
    return _out(loss, _frac_tokens((weight != r).astype(jnp.float32), mask), seq_mean_token_mean(weight, mask))


def areal_loss(logp, logp_mu, mask, adv, *, logp_prox=None, eps=0.2):
    """AReaL decoupled PPO (2505.24298): (pi_prox/mu) min(u A, clip(u, 1 +- eps) A), u = pi/pi_prox.

    `logp_prox` defaults to sg[logp] (proximal policy = the current parameters, one step per batch)."""
    mask, _ = _prep(logp, logp_mu, mask, adv)
    prox = jax.lax.stop_gradient(logp) if logp_prox is None else logp_prox
    if prox.shape != logp.shape:
        raise ValueError(f"logp_prox shape {prox.shape} does not match logp shape {logp.shape}")
    behav = jnp.exp(prox - logp_mu)
    u = jnp.exp(logp - prox)
    a = adv[:, None]
    clipped = jnp.clip(u, 1.0 - eps, 1.0 + eps)
    per_tok = -behav * jnp.minimum(u * a, clipped * a)
    return _out(seq_mean_token_mean(per_tok, mask), _frac_tokens((u * a > clipped * a).astype(jnp.float32), mask),
                seq_mean_token_mean(behav, mask))


LOSSES: dict[str, Callable] = {
    "reinforce": reinforce_loss,
    "ppo_clip": ppo_clip_loss,
    "token_tis": token_tis_loss,
    "seq_tis": seq_tis_loss,
    "token_mis": token_mis_loss,
    "seq_mis": seq_mis_loss,
    "geo_mis": geo_mis_loss,
    "m2po": m2po_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
    "areal": areal_loss,
    # VCPO's objective is sequence TIS with C = 8 (rollout_is=sequence, rollout_is_threshold=8.0).
    "vcpo": functools.partial(seq_tis_loss, c=8.0),
}


def is_diagnostics(logp, logp_mu, mask, *, c=8.0):
    """Per-step importance-sampling diagnostics: ESS ratio (unclipped and clipped at c), max w / sum w, log10 w
    quantiles, k3 estimate of KL(mu || pi) (token mean), fraction of sequences with w > c."""
    _check_token_inputs(logp, logp_mu, mask)
    mask = mask.astype(logp.dtype)
    log_r = jax.lax.stop_gradient(logp - logp_mu)
    log_w = jnp.sum(log_r * mask, -1)
    clipped_log_w = jnp.minimum(log_w, jnp.log(c))
    w_norm = jax.nn.softmax(log_w)
    q05, q50, q95 = jnp.quantile(log_w / jnp.log(10.0), jnp.array([0.05, 0.5, 0.95]))
    k3 = jnp.exp(log_r) - 1.0 - log_r  # r - 1 - log r with r = pi/mu, sampled under mu: unbiased for KL(mu || pi)
    return {
        "ess_ratio": ess_ratio(log_w),
        "ess_ratio_clipped": ess_ratio(clipped_log_w),
        "max_w_frac": jnp.max(w_norm),
        "log10_w_q05": q05,
        "log10_w_q50": q50,
        "log10_w_q95": q95,
        "kl_mu_pi_k3": jnp.sum(k3 * mask) / jnp.maximum(jnp.sum(mask), 1.0),
        "frac_seq_w_gt_c": jnp.mean((log_w > jnp.log(c)).astype(jnp.float32)),
    }
