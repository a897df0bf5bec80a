"""VCPO: variance-controlled off-policy RL (arXiv 2602.17616, mit-han-lab/vcpo) in pure JAX functions.

- `losses`: off-policy policy-gradient losses (`LOSSES[name]`), `ess_ratio`, `lr_scale`, `opob_baseline`,
  the two-sum gradient, advantage estimators and importance-sampling diagnostics.
- `sim`: an asynchronous actor/learner simulation (lag k via a snapshot ring buffer inside one compiled loop) on
  digit reversal with the shared Llama decoder, and the Monte-Carlo gradient-variance probe.
"""

from jaxeff.checks import Registry, UnknownNameError
from jaxeff.vcpo.losses import (
    ESS_OVERFLOW,
    ESS_SPACES,
    LOSSES,
    LR_RULES,
    MAX_LOG_RATIO,
    OPOB_FORMS,
    OPOB_WEIGHTINGS,
    ess_ratio,
    group_stats,
    grpo_advantages,
    is_diagnostics,
    lr_scale,
    m2po_keep_mask,
    masked_log_ratio,
    opo_advantages,
    opob_advantages,
    opob_baseline,
    opob_log_weights,
    seq_mean,
    seq_mean_token_mean,
    sequence_log_weights,
    token_mean,
    two_sum_gradient,
)

__all__ = [
    "LOSSES",
    "LR_RULES",
    "ESS_OVERFLOW",
    "ESS_SPACES",
    "MAX_LOG_RATIO",
    "OPOB_FORMS",
    "OPOB_WEIGHTINGS",
    "Registry",
    "UnknownNameError",
    "ess_ratio",
    "group_stats",
    "grpo_advantages",
    "is_diagnostics",
    "lr_scale",
    "m2po_keep_mask",
    "opo_advantages",
    "opob_advantages",
    "masked_log_ratio",
    "opob_baseline",
    "opob_log_weights",
    "seq_mean",
    "seq_mean_token_mean",
    "sequence_log_weights",
    "token_mean",
    "two_sum_gradient",
]
