"""Off-policy policy-gradient losses, VCPO's ESS learning-rate scale and OPOB baseline, and diagnostics.

Everything here is a pure function of arrays (jit- and vmap-able). Shapes: `logp`, `logp_mu`, `mask` are per-token
[B, T] float32 (log pi_theta, behaviour log mu recorded at sampling, 1 for response tokens); `adv`, `rewards`,
`group_ids` are per-sequence [B]. Every loss aggregates seq-mean-token-mean (token mean inside a sequence, then mean
over the sequences that have tokens) and returns `(loss, metrics)` with the same metric keys, so methods can be
swapped inside one program. Source: mit-han-lab/vcpo (verl fork) for ESS / OPOB / seq-TIS, each baseline's paper
or verl for the others (named per function).

Numerics: for finite inputs no loss, advantage or diagnostic returns NaN or inf, in values or gradients. Masked
tokens never contribute: the log-ratio is zeroed with `jnp.where` before any `exp` (the "double where", so the
masked branch has neither an inf value nor a 0 * inf gradient). A per-token ratio that enters a loss unclipped is
`exp(min(log r, MAX_LOG_RATIO))` (the cap tunix's GRPO loss uses, ±20): beyond e^20 that token's value saturates
and its gradient through the ratio is 0. Sequence weights are only exponentiated after truncation or masking.

Value checks (empty group, all-masked batch) run when the arrays are concrete and raise ValueError; under `jit`
the same inputs give finite values (0 where nothing is defined). Ran on CPU only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.checks import Registry, is_concrete

EPS = 1e-8  # the official absolute epsilon of the ESS ratio and the OPOB weighted mean
MAX_LOG_RATIO = 20.0
F32_MAX_LOG = float(np.log(np.finfo(np.float32).max))  # ~88.72: exp overflows float32 above this
LR_RULES = ("sqrt", "linear", "none")
OPOB_WEIGHTINGS = ("code", "readme")
OPOB_FORMS = ("official", "group_normalized")
ESS_SPACES = ("linear", "log")
ESS_OVERFLOW = ("true_ratio", "official_nan")


def _check_token_inputs(logp, logp_mu, mask):
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T], got shape {logp.shape}")
    for name, x in (("logp_mu", logp_mu), ("mask", mask)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} shape {x.shape} does not match logp shape {logp.shape}")
    if mask is not None and is_concrete(mask) and not np.any(np.asarray(mask) > 0):
        raise ValueError("mask selects no token: the batch is empty")


def _check_seq(name, x, batch):
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {x.shape}")


def _ratio(log_r):
    """exp(log r) with the exponent capped at MAX_LOG_RATIO (finite value and gradient)."""
    return jnp.exp(jnp.minimum(log_r, MAX_LOG_RATIO))


def masked_log_ratio(logp, logp_mu, mask):
    """log pi - log mu on response tokens, exactly 0 (value and gradient) on masked ones: [B, T]."""
    return jnp.where(mask > 0, logp - logp_mu, 0.0)


def token_mean(x, mask):
    """Per-sequence mean over masked tokens [B]; 0 for a sequence without tokens. Masked entries are selected
    away (not multiplied by 0), so an inf there does not leak."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0), -1) / jnp.maximum(jnp.sum(mask > 0, -1), 1).astype(x.dtype)


def seq_mean(x, mask):
    """Mean of a per-sequence value [B] over the sequences that have tokens (mask [B, T]); 0 if none has."""
    valid = jnp.any(mask > 0, -1)
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(x.dtype)


def seq_mean_token_mean(x, mask):
    """Mean over sequences that have tokens of the per-sequence token mean (verl's seq-mean-token-mean)."""
    return seq_mean(token_mean(x, mask), mask)


def sequence_log_weights(logp, logp_mu, mask):
    """log w_i = sum_t [log pi_theta - log mu] over response tokens: [B]."""
    _check_token_inputs(logp, logp_mu, mask)
    return jnp.sum(masked_log_ratio(logp, logp_mu, mask), -1)


def ess_ratio(log_w, mask=None, *, space="linear", eps=EPS, overflow="true_ratio"):
    """Kish ESS / B from sequence log-weights [B] (mask [B] selects sequences): a float32 scalar in [0, 1].

    space="linear" (default, the official `compute_ess_info`): (sum w)^2 / (B (sum w^2 + eps)) with w = exp(log w)
    in float32 and an absolute eps = 1e-8. Its regimes, kept on purpose: when every w is tiny the eps dominates and
    the ratio is pulled toward 0 (all w = 1e-6, B = 512: 0.05); log w below about -103 underflows w to 0, and a
    batch of all-zero w gives 0 (lr fully damped). The squares are formed relative to the largest weight, so they do
    not overflow float32 before w itself does (the official code squares Python float64s). When some w overflows
    float32 (log w > 88.72) the official ratio is inf/inf = NaN and its lr rule `min(1, nan)` applies no damping;
    overflow="true_ratio" (default) returns the log-space ratio there (about 1/B for one dominant weight) and
    overflow="official_nan" returns 1.0, what the official lr rule effectively sees (parity runs only).

    space="log": scale-free, (sum w')^2 / (B sum w'^2) with w' = exp(log w - max log w), no eps: a diagnostic that
    neither under- nor overflows. 1 for equal weights, 1/B for one-hot.
    """
    if log_w.ndim != 1:
        raise ValueError(f"log_w must be [B], got shape {log_w.shape}")
    if space not in ESS_SPACES:
        raise ValueError(f"unknown ESS space {space!r}; options: {ESS_SPACES}")
    if overflow not in ESS_OVERFLOW:
        raise ValueError(f"unknown ESS overflow mode {overflow!r}; options: {ESS_OVERFLOW}")
    valid = jnp.ones(log_w.shape, bool) if mask is None else mask > 0
    if valid.shape != log_w.shape:
        raise ValueError(f"mask shape {valid.shape} does not match log_w shape {log_w.shape}")
    if mask is not None and is_concrete(mask) and not np.any(np.asarray(mask) > 0):
        raise ValueError("ess_ratio: mask selects no sequence")
    log_w = jnp.where(valid, log_w, 0.0)
    n = jnp.sum(valid).astype(jnp.float32)
    top = jnp.max(jnp.where(valid, log_w, -jnp.inf))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w_rel = jnp.where(valid, jnp.exp(log_w - top), 0.0)  # in (0, 1], the largest is 1
    s1, s2 = jnp.sum(w_rel), jnp.sum(w_rel**2)
    log_space = s1**2 / jnp.maximum(n * s2, EPS)
    if space == "log":
        return jnp.where(n > 0, log_space, 0.0)
    # Linear space with w = w_rel * e^top: (sum w)^2 / (n (sum w^2 + eps)) = s1^2 / (n (s2 + eps e^{-2 top})).
    # Below top = 0 the same formula is evaluated without the shift, so underflow of w to 0 is as in float32.
    w_lin = jnp.where(valid, jnp.exp(jnp.minimum(log_w, 0.0)), 0.0)
    small = jnp.sum(w_lin) ** 2 / jnp.maximum(n * (jnp.sum(w_lin**2) + eps), EPS)
    large = s1**2 / jnp.maximum(n * (s2 + eps * jnp.exp(-2.0 * jnp.maximum(top, 0.0))), EPS)
    linear = jnp.where(top > 0, large, small)
    overflowed = top > F32_MAX_LOG
    linear = jnp.where(overflowed, log_space if overflow == "true_ratio" else 1.0, linear)
    return jnp.where(n > 0, linear, 0.0)


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
        if not is_concrete(group_ids):
            raise ValueError("num_groups must be given when group_ids is traced (under jit/vmap)")
        num_groups = int(np.max(np.asarray(group_ids))) + 1
    if is_concrete(group_ids):
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


def opob_log_weights(log_w, score_sq_norms, *, weighting="code", clip_c=8.0, lengths=None,
                     normalize_by_length=False):
    """log W_i of the OPOB weights [B]; -inf where W_i = 0 (a zero score norm).

    weighting="code" (official default): W = min(w, c)^2 w^2 ||s||^2 (the released code's g_i already carries the
    truncated weight, and `use_is_weights` multiplies by w^2 again); "readme": W = w^2 ||s||^2. `score_sq_norms` is
    ||s_i||^2 of the token-sum score grad sum_t log pi (the official norm, unscaled by 1/B). normalize_by_length
    (official option, off by default) divides W by L_i^2, i.e. uses the token-mean score. Log space, so W never
    overflows float32 (the official code forms it in Python float64)."""
    if weighting not in OPOB_WEIGHTINGS:
        raise ValueError(f"unknown OPOB weighting {weighting!r}; options: {OPOB_WEIGHTINGS}")
    pos = score_sq_norms > 0
    out = 2.0 * log_w + jnp.where(pos, jnp.log(jnp.where(pos, score_sq_norms, 1.0)), -jnp.inf)
    if weighting == "code":
        out = out + 2.0 * jnp.minimum(log_w, jnp.log(clip_c))
    if normalize_by_length:
        if lengths is None:
            raise ValueError("normalize_by_length=True needs the response lengths")
        _check_seq("lengths", lengths, log_w.shape[0])
        out = out - 2.0 * jnp.log(jnp.maximum(lengths.astype(out.dtype), 1.0))
    return out


def opob_baseline(rewards, log_w, score_sq_norms, group_ids, *, num_groups=None, weighting="code", clip_c=8.0,
                  form="official", lengths=None, normalize_by_length=False, eps=EPS):
    """Off-policy optimal baseline per prompt group, returned per sample [B] (`compute_opob_baseline`):
    b*_g = sum_{i in g} W_i R_i / (sum_{i in g} W_i + eps), W_i from `opob_log_weights`.

    form="official" (default): the absolute eps = 1e-8 as in the code; when every W in a group is tiny b* is pulled
    toward 0, and a group whose W are all 0 gets b* = 0. Evaluated relative to the group's largest W, so it equals
    the float64 official value to rounding without overflowing. form="group_normalized": the weights are divided by
    their group maximum first (scale-free, no eps) and an all-zero group gets its reward mean."""
    if form not in OPOB_FORMS:
        raise ValueError(f"unknown OPOB form {form!r}; options: {OPOB_FORMS}")
    batch = rewards.shape[0] if rewards.ndim == 1 else -1
    for name, x in (("rewards", rewards), ("log_w", log_w), ("score_sq_norms", score_sq_norms),
                    ("group_ids", group_ids)):
        _check_seq(name, x, batch)
    counts, num_groups = _group_counts(group_ids, num_groups)
    log_big = opob_log_weights(log_w, score_sq_norms, weighting=weighting, clip_c=clip_c, lengths=lengths,
                               normalize_by_length=normalize_by_length)
    top = jax.ops.segment_max(log_big, group_ids, num_groups)
    has = jnp.isfinite(top)
    top = jnp.where(has, top, 0.0)
    rel = jnp.where(jnp.isfinite(log_big), jnp.exp(log_big - top[group_ids]), 0.0)  # largest in a group is 1
    num = jax.ops.segment_sum(rel * rewards, group_ids, num_groups)
    den = jax.ops.segment_sum(rel, group_ids, num_groups)
    if form == "official":
        # eps / max W, exponent capped: beyond e^80 b* is 0 to float32 precision either way.
        b = jnp.where(has, num / (den + jnp.exp(jnp.minimum(jnp.log(eps) - top, 80.0))), 0.0)
    else:
        mean = jax.ops.segment_sum(rewards, group_ids, num_groups) / jnp.maximum(counts, 1.0)
        b = jnp.where(has, num / jnp.where(has, den, 1.0), mean)
    return b[group_ids]


def grpo_advantages(rewards, group_ids, *, num_groups=None, norm_by_std=True):
    """GRPO (verl): (R - group mean) / (group population std + 1e-6); a zero-variance group gets 0."""
    mean, std = group_stats(rewards, group_ids, num_groups)
    return (rewards - mean) / (std + 1e-6) if norm_by_std else rewards - mean


def opob_advantages(rewards, baseline, group_ids, *, num_groups=None, norm_by_std=True):
    """VCPO: (R - b*_g) / sigma_g with the group population std; as the official code, no division when
    sigma_g <= 1e-8 (a zero-variance group keeps R - b*)."""
    _, std = group_stats(rewards, group_ids, num_groups)
    if not norm_by_std:
        return rewards - baseline
    return (rewards - baseline) / jnp.where(std > 1e-8, std, 1.0)


def opo_advantages(rewards, lengths, group_ids, *, num_groups=None):
    """OPO (2505.23585): on-policy baseline b = sum l_i R_i / sum l_i per group (length l stands in for ||s||^2)."""
    _check_seq("lengths", lengths, rewards.shape[0])
    b = opob_baseline(rewards, jnp.zeros_like(rewards), lengths.astype(rewards.dtype), group_ids,
                      num_groups=num_groups, weighting="readme", form="group_normalized")
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
    return jnp.sum(jnp.where(mask > 0, flag, 0.0)) / jnp.maximum(jnp.sum(mask > 0), 1).astype(jnp.float32)


def _prep(logp, logp_mu, mask, adv):
    _check_token_inputs(logp, logp_mu, mask)
    _check_seq("adv", adv, logp.shape[0])
    mask = mask.astype(logp.dtype)
    return mask, jax.lax.stop_gradient(masked_log_ratio(logp, logp_mu, mask))


def reinforce_loss(logp, logp_mu, mask, adv, *, logp_prox=None):
    """On-policy REINFORCE / GRPO with one step per batch (PPO ratio 1): -A * log pi. Stale data is taken as
    on-policy, which is the "naive async" baseline."""
    mask, _ = _prep(logp, logp_mu, mask, adv)
    return _out(seq_mean_token_mean(-adv[:, None] * logp, mask), 0.0, 1.0)


def ppo_clip_loss(logp, logp_mu, mask, adv, *, logp_prox=None, eps_low=0.2, eps_high=0.2):
    """PPO / GRPO clipped surrogate against the behaviour policy: -min(r A, clip(r, 1-eps, 1+eps) A), r = pi/mu."""
    mask, _ = _prep(logp, logp_mu, mask, adv)
    ratio = _ratio(masked_log_ratio(logp, logp_mu, mask))
    a = adv[:, None]
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_tok = -jnp.minimum(ratio * a, clipped * a)
    was_clipped = (ratio * a > clipped * a).astype(jnp.float32)
    return _out(seq_mean_token_mean(per_tok, mask), _frac_tokens(was_clipped, mask), seq_mean_token_mean(ratio, mask))


def token_tis_loss(logp, logp_mu, mask, adv, *, logp_prox=None, c=2.0):
    """Token-level truncated IS (Yao et al.; verl rollout_is=token): -sg[min(r_t, C)] A log pi."""
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    weight = jnp.exp(jnp.minimum(log_r, jnp.log(c)))
    loss = seq_mean_token_mean(-weight * adv[:, None] * logp, mask)
    return _out(loss, _frac_tokens((log_r > jnp.log(c)).astype(jnp.float32), mask), seq_mean_token_mean(weight, mask))


def seq_tis_loss(logp, logp_mu, mask, adv, *, logp_prox=None, c=8.0):
    """Sequence-level truncated IS: -sg[min(w_i, C)] A_i (1/|y_i|) sum_t log pi (VCPO's loss with C = 8)."""
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    log_w = jnp.sum(log_r, -1)
    weight = jnp.exp(jnp.minimum(log_w, jnp.log(c)))
    loss = seq_mean(-weight * adv * token_mean(logp, mask), mask)
    return _out(loss, seq_mean((log_w > jnp.log(c)).astype(jnp.float32), mask), seq_mean(weight, mask))


def _bounds(low, high):
    if not high > 0 or (low is not None and not 0 < low <= high):
        raise ValueError(f"rejection bounds need 0 < low <= high, got low={low}, high={high}")
    return jnp.log(1.0 / high if low is None else low), jnp.log(high)


def token_mis_loss(logp, logp_mu, mask, adv, *, logp_prox=None, low=0.5, high=5.0, is_weighted=False):
    """Token-level masked IS (verl rollout_rs=token; IcePop 2510.18855 bounds [0.5, 5]). Default, verl semantics:
    a pure rejection mask, the response mask times 1[low <= r_t <= high] (low=None: 1/high), so a rejected token
    also leaves its sequence's token mean; the kept tokens get the plain -A log pi. is_weighted=True (not verl
    semantics): kept tokens are multiplied by r_t and the token mean keeps the original token count."""
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    lo, hi = _bounds(low, high)
    keep = (log_r >= lo) & (log_r <= hi) & (mask > 0)
    if is_weighted:
        weight = jnp.where(keep, jnp.exp(jnp.where(keep, log_r, 0.0)), 0.0)
        loss = seq_mean_token_mean(-weight * adv[:, None] * logp, mask)
        return _out(loss, _frac_tokens(1.0 - keep, mask), seq_mean_token_mean(weight, mask))
    kept = keep.astype(logp.dtype)
    return _out(seq_mean_token_mean(-adv[:, None] * logp, kept), _frac_tokens(1.0 - kept, mask),
                seq_mean_token_mean(kept, mask))


def _seq_masked_is(logp, logp_mu, mask, adv, *, low, high, geometric, is_weighted):
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    lo, hi = _bounds(low, high)
    log_w = jnp.sum(log_r, -1)
    stat = token_mean(log_r, mask) if geometric else log_w
    keep = (stat >= lo) & (stat <= hi)
    weight = jnp.where(keep, _ratio(jnp.where(keep, log_w, 0.0)) if is_weighted else 1.0, 0.0)
    if is_weighted:
        loss = seq_mean(-weight * adv * token_mean(logp, mask), mask)
    else:  # a rejected sequence leaves the loss (and its denominator), as verl's multiplied response mask does
        loss = seq_mean_token_mean(-adv[:, None] * logp, mask * keep[:, None])
    return _out(loss, 1.0 - seq_mean(keep.astype(jnp.float32), mask), seq_mean(weight, mask))


def seq_mis_loss(logp, logp_mu, mask, adv, *, logp_prox=None, low=None, high=2.0, is_weighted=False):
    """Sequence-level masked IS (verl rollout_rs=sequence): the whole sequence is rejected when w_i is outside
    [low, high] (low=None: 1/high); kept sequences get -A log pi. is_weighted=True (not verl semantics): kept
    sequences carry w_i and rejected ones still count in the sequence mean."""
    return _seq_masked_is(logp, logp_mu, mask, adv, low=low, high=high, geometric=False, is_weighted=is_weighted)


def geo_mis_loss(logp, logp_mu, mask, adv, *, logp_prox=None, low=None, high=1.001, is_weighted=False):
    """Geometric-mean MIS (verl rollout_rs=geometric): reject the sequence when exp(mean_t log r_t) is outside
    [low, high] (low=None: 1/high). is_weighted=True (not verl semantics): kept sequences carry w_i."""
    return _seq_masked_is(logp, logp_mu, mask, adv, low=low, high=high, geometric=True, is_weighted=is_weighted)


def m2po_keep_mask(log_r, mask, tau=0.04):
    """M2PO's second-moment trust region: drop the tokens with the largest (log r)^2 until the mean (log r)^2 of the
    remaining (masked) tokens is <= tau. Returns the kept-token mask [B, T]."""
    sq = jnp.where(mask > 0, log_r**2, jnp.inf).reshape(-1)  # a square overflowing to inf is dropped first anyway
    order = jnp.argsort(sq)
    sorted_sq = sq[order]
    count = jnp.arange(1, sq.shape[0] + 1, dtype=sq.dtype)
    prefix_mean = jnp.cumsum(jnp.where(jnp.isfinite(sorted_sq), sorted_sq, 0.0)) / count
    # Prefix means of an ascending sort are nondecreasing, so the admissible prefixes are a prefix themselves.
    n_keep = jnp.sum((prefix_mean <= tau) & jnp.isfinite(sorted_sq))
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    return ((rank < n_keep).reshape(mask.shape) & (mask > 0)).astype(log_r.dtype)


def m2po_loss(logp, logp_mu, mask, adv, *, logp_prox=None, tau=0.04):
    """M2PO (2510.01161): unclipped token IS -r_t A on the tokens kept by the second-moment constraint; dropped
    tokens count in the token mean."""
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    keep = m2po_keep_mask(log_r, mask, tau)
    ratio = _ratio(masked_log_ratio(logp, logp_mu, keep))
    loss = seq_mean_token_mean(-keep * ratio * adv[:, None], mask)
    return _out(loss, _frac_tokens(1.0 - keep, mask), seq_mean_token_mean(keep * ratio, mask))


def gspo_loss(logp, logp_mu, mask, adv, *, logp_prox=None, eps_low=3e-4, eps_high=4e-4):
    """GSPO (2507.18071): s_i = (pi(y_i)/mu(y_i))^(1/|y_i|); -min(s A, clip(s, 1-eps_low, 1+eps_high) A)."""
    mask, _ = _prep(logp, logp_mu, mask, adv)
    s = _ratio(token_mean(masked_log_ratio(logp, logp_mu, mask), mask))
    clipped = jnp.clip(s, 1.0 - eps_low, 1.0 + eps_high)
    loss = seq_mean(-jnp.minimum(s * adv, clipped * adv), mask)
    return _out(loss, seq_mean((s * adv > clipped * adv).astype(jnp.float32), mask), seq_mean(s, mask))


def cispo_loss(logp, logp_mu, mask, adv, *, logp_prox=None, eps_low=1.0, eps_high=0.28):
    """CISPO (2506.13585): -sg[clip(r_t, 1-eps_low, 1+eps_high)] A log pi (eps_low = 1: no lower bound)."""
    mask, log_r = _prep(logp, logp_mu, mask, adv)
    r = _ratio(log_r)
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
    behav = _ratio(masked_log_ratio(prox, logp_mu, mask))
    u = _ratio(masked_log_ratio(logp, prox, mask))
    a = adv[:, None]
    clipped = jnp.clip(u, 1.0 - eps, 1.0 + eps)
    per_tok = -behav * jnp.minimum(u * a, clipped * a)
    return _out(seq_mean_token_mean(per_tok, mask), _frac_tokens((u * a > clipped * a).astype(jnp.float32), mask),
                seq_mean_token_mean(behav, mask))


# LOSSES["name"] with an unknown name raises UnknownNameError (a ValueError) listing the known names.
LOSSES: Registry = Registry("loss", {
    "reinforce": reinforce_loss,
    "ppo_clip": ppo_clip_loss,
    "token_tis": token_tis_loss,
    "seq_tis": seq_tis_loss,
    "token_mis": token_mis_loss,
    "seq_mis": seq_mis_loss,
    "geo_mis": geo_mis_loss,
    # IS-weighted masked variants: not verl's semantics (kept samples multiplied by their weight).
    "token_mis_is": functools.partial(token_mis_loss, is_weighted=True),
    "seq_mis_is": functools.partial(seq_mis_loss, is_weighted=True),
    "geo_mis_is": functools.partial(geo_mis_loss, is_weighted=True),
    "m2po": m2po_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
    "areal": areal_loss,
    # VCPO's objective is sequence TIS with C = 8 (rollout_is=sequence, rollout_is_threshold=8.0).
    "vcpo": functools.partial(seq_tis_loss, c=8.0),
})


def is_diagnostics(logp, logp_mu, mask, *, c=8.0):
    """Per-step importance-sampling diagnostics over the sequences that have tokens: ESS ratio (official linear
    space, the lr rule's input; log space; linear space of the weights clipped at c), max w / sum w, log10 w
    quantiles, k3 estimate of KL(mu || pi) (token mean, per-token ratio capped at e^20), fraction of sequences
    with w > c."""
    _check_token_inputs(logp, logp_mu, mask)
    log_r = jax.lax.stop_gradient(masked_log_ratio(logp, logp_mu, mask))
    valid = jnp.any(mask > 0, -1)
    log_w = jnp.sum(log_r, -1)
    w_norm = jax.nn.softmax(jnp.where(valid, log_w, -jnp.inf))
    w_norm = jnp.where(jnp.any(valid), w_norm, 0.0)
    q = jnp.nanquantile(jnp.where(valid, log_w / jnp.log(10.0), jnp.nan), jnp.array([0.05, 0.5, 0.95]))
    q = jnp.where(jnp.isnan(q), 0.0, q)
    k3 = _ratio(log_r) - 1.0 - log_r  # r - 1 - log r with r = pi/mu, sampled under mu: unbiased for KL(mu || pi)
    return {
        "ess_ratio": ess_ratio(log_w, valid),
        "ess_ratio_log": ess_ratio(log_w, valid, space="log"),
        "ess_ratio_clipped": ess_ratio(jnp.minimum(log_w, jnp.log(c)), valid),
        "max_w_frac": jnp.max(w_norm),
        "log10_w_q05": q[0],
        "log10_w_q50": q[1],
        "log10_w_q95": q[2],
        "kl_mu_pi_k3": jnp.sum(jnp.where(mask > 0, k3, 0.0)) / jnp.maximum(jnp.sum(mask > 0), 1),
        "frac_seq_w_gt_c": seq_mean((log_w > jnp.log(c)).astype(jnp.float32), mask),
    }
