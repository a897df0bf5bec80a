"""Asynchronous actor/learner simulation for off-policy RL on digit reversal, as one pure compiled function.

`make_train(cfg, method)` returns `train(rng, lag)` (PureJaxRL style): nested `lax.scan` (evaluation chunks x
optimizer steps), a ring buffer of the last `max_lag + 1` parameter snapshots inside the loop, rollouts sampled
from the snapshot `lag` optimizer steps old with their behaviour log-probs recorded at sampling time (optionally
with trainer/rollout mismatch noise on the behaviour logits), one optimizer step per rollout batch. `lag` is a
traced scalar, so `jax.vmap` runs every (lag, seed) cell of a grid in one program; `run_grid` does that.

The policy is the shared Llama decoder trained from scratch: prompt = L digits (L uniform in [min_digits,
num_digits], padded with PAD to num_digits) then SEP, response = the L digits reversed, so responses have variable
length (the mask covers the first L response positions); reward = fraction of the L positions correct;
`group_size` samples per prompt. Sampling recomputes the full (short) sequence per token, which is simpler than a
KV cache and cheap at these lengths.

Run on CPU only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.checks import Registry
from jaxeff.models.llama import Llama, LlamaConfig
from jaxeff.vcpo import losses as L

ADVANTAGES = ("grpo", "opob", "opo")
# Losses linear in the advantage: the two-sum OPOB gradient sum_i A_i g_i is exact for them.
LINEAR_LOSSES = ("reinforce", "seq_tis", "vcpo")


@dataclasses.dataclass(frozen=True)
class Method:
    """An RL method = a loss from `LOSSES`, an advantage estimator and a learning-rate rule."""

    loss: str
    advantage: str = "grpo"
    lr_rule: str = "none"

    def __post_init__(self):
        if self.loss not in L.LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; losses: {sorted(L.LOSSES)}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"unknown advantage {self.advantage!r}; options: {ADVANTAGES}")
        if self.advantage == "opob" and self.loss not in LINEAR_LOSSES:
            raise ValueError(f"OPOB's two-sum gradient needs a loss linear in the advantage {LINEAR_LOSSES}")
        if self.lr_rule not in L.LR_RULES:
            raise ValueError(f"unknown lr rule {self.lr_rule!r}; rules: {L.LR_RULES}")


METHODS: Registry = Registry("method", {
    "naive": Method("reinforce"),  # stale data treated as on-policy
    "ppo_clip": Method("ppo_clip"),
    "token_tis": Method("token_tis"),
    "seq_tis": Method("seq_tis"),
    "mis": Method("token_mis"),  # verl rollout_rs=token (IcePop bounds), pure rejection mask
    "seq_mis": Method("seq_mis"),
    "geo_mis": Method("geo_mis"),
    "mis_is": Method("token_mis_is"),  # IS-weighted variant, not verl semantics
    "m2po": Method("m2po"),
    "gspo": Method("gspo"),
    "cispo": Method("cispo"),
    "areal": Method("areal"),
    "opo": Method("reinforce", "opo"),
    "vcpo": Method("vcpo", "opob", "sqrt"),
    "vcpo_no_ess": Method("vcpo", "opob", "none"),
    "vcpo_no_opob": Method("vcpo", "grpo", "sqrt"),
})


@dataclasses.dataclass(frozen=True)
class SimConfig:
    num_digits: int = 4
    min_digits: int | None = None  # None: fixed length num_digits
    base: int = 10  # digits 0..base-1; token `base` is SEP, `base + 1` is PAD
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 64
    rope_theta: float = 20.0  # short sequences: a small base keeps several RoPE frequencies position-discriminative
    prompts_per_step: int = 8
    group_size: int = 8
    steps: int = 300
    eval_every: int = 25
    eval_prompts: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_lag: int = 16  # ring buffer holds max_lag + 1 snapshots; every lag run must be <= max_lag
    mismatch_noise: float = 0.0  # std of Gaussian noise on the behaviour logits (trainer/rollout mismatch)
    rho_on: float = 1.0
    opob_weighting: str = "code"
    opob_form: str = "official"
    opob_normalize_by_length: bool = False  # official option: token-mean score norm (W / L^2)
    tis_c: float = 8.0
    ess_use_clipped: bool = False  # the official default scales the lr by the ESS of the unclipped weights
    ess_space: str = "linear"  # the official linear-space ESS drives the lr; "log" is the scale-free one

    def validate(self):
        positive = ("num_digits", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                    "prompts_per_step", "group_size", "steps", "eval_every", "eval_prompts", "base")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.base <= 100:
            raise ValueError(f"base must be in [2, 100], got {self.base}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (group baselines need several samples per prompt)")
        if self.steps % self.eval_every:
            raise ValueError(f"steps ({self.steps}) must be a multiple of eval_every ({self.eval_every})")
        if self.max_lag < 0 or self.mismatch_noise < 0 or self.lr <= 0 or self.rho_on <= 0:
            raise ValueError("max_lag and mismatch_noise must be >= 0, lr and rho_on > 0")
        if self.opob_weighting not in L.OPOB_WEIGHTINGS:
            raise ValueError(f"opob_weighting must be one of {L.OPOB_WEIGHTINGS}")
        if self.opob_form not in L.OPOB_FORMS:
            raise ValueError(f"opob_form must be one of {L.OPOB_FORMS}")
        if self.ess_space not in L.ESS_SPACES:
            raise ValueError(f"ess_space must be one of {L.ESS_SPACES}")
        if self.min_digits is not None and not 1 <= self.min_digits <= self.num_digits:
            raise ValueError(f"min_digits must lie in [1, num_digits={self.num_digits}], got {self.min_digits}")

    @property
    def sep(self) -> int:
        return self.base

    @property
    def pad(self) -> int:
        return self.base + 1

    @property
    def batch(self) -> int:
        return self.prompts_per_step * self.group_size

    def llama(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.base + 2, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size,
                           num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                           num_key_value_heads=self.num_kv_heads, rope_theta=self.rope_theta,
                           max_position_embeddings=2 * self.num_digits + 1)


class Policy:
    """Pure functions of a parameter pytree around the shared decoder (nnx.split once, nnx.merge per call)."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.graphdef, _, self.rest = nnx.split(Llama(cfg.llama(), rngs=nnx.Rngs(0)), nnx.Param, ...)

    def init(self, key):
        return nnx.state(Llama(self.cfg.llama(), rngs=nnx.Rngs(params=key)), nnx.Param)

    def logits(self, params, tokens):
        return nnx.merge(self.graphdef, params, self.rest)(tokens)

    def token_logp(self, params, tokens):
        """log pi(response token | prefix) [B, n] and per-token entropy [B, n]."""
        n = self.cfg.num_digits
        logp_all = jax.nn.log_softmax(self.logits(params, tokens)[:, n : 2 * n], -1)
        logp = jnp.take_along_axis(logp_all, tokens[:, n + 1 :, None], -1)[..., 0]
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
        return logp, entropy

    def rollout(self, params, prompts, key, *, greedy=False, noise=0.0):
        """Sample responses: tokens [B, 2n+1] and behaviour log-probs [B, n] recorded at sampling time."""
        n, b = self.cfg.num_digits, prompts.shape[0]
        tokens = jnp.concatenate([prompts, jnp.full((b, 1), self.cfg.sep), jnp.zeros((b, n), prompts.dtype)], 1)

        def step(carry, t):
            tokens, key = carry
            key, k_noise, k_tok = jax.random.split(key, 3)
            logits = jax.lax.dynamic_index_in_dim(self.logits(params, tokens), n + t, 1, keepdims=False)
            logits = logits + noise * jax.random.normal(k_noise, logits.shape)
            logp_all = jax.nn.log_softmax(logits, -1)
            tok = jnp.argmax(logits, -1) if greedy else jax.random.categorical(k_tok, logits)
            tok = tok.astype(tokens.dtype)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, n + 1 + t, 1)
            return (tokens, key), jnp.take_along_axis(logp_all, tok[:, None], -1)[:, 0]

        (tokens, _), logp_mu = jax.lax.scan(step, (tokens, key), jnp.arange(n))
        return tokens, logp_mu.T

    def lengths(self, tokens):
        """Prompt (= target response) length L [B]: the digits before the first PAD."""
        return jnp.sum(tokens[:, : self.cfg.num_digits] != self.cfg.pad, -1)

    def response_mask(self, tokens):
        """1 on the first L response positions [B, n] (float32)."""
        return (jnp.arange(self.cfg.num_digits)[None] < self.lengths(tokens)[:, None]).astype(jnp.float32)

    def rewards(self, tokens):
        """Fraction of the L response positions equal to the reversed digits [B]."""
        n = self.cfg.num_digits
        length = self.lengths(tokens)
        # Reversed prompt digits: target[t] = prompt[L - 1 - t] for t < L.
        idx = jnp.clip(length[:, None] - 1 - jnp.arange(n)[None], 0, n - 1)
        target = jnp.take_along_axis(tokens[:, :n], idx, 1)
        return L.token_mean((tokens[:, n + 1 :] == target).astype(jnp.float32), self.response_mask(tokens))


def sample_prompts(cfg: SimConfig, key, num_prompts):
    """Prompts [P, n]: L digits, L uniform in [min_digits, num_digits], then PAD."""
    k_dig, k_len = jax.random.split(key)
    digits = jax.random.randint(k_dig, (num_prompts, cfg.num_digits), 0, cfg.base, dtype=jnp.int32)
    if cfg.min_digits is None:
        return digits
    length = jax.random.randint(k_len, (num_prompts, 1), cfg.min_digits, cfg.num_digits + 1)
    return jnp.where(jnp.arange(cfg.num_digits)[None] < length, digits, cfg.pad)


def loss_kwargs(cfg: SimConfig, loss_name: str) -> dict:
    """The truncation level C of the sequence-TIS losses comes from the config (`tis_c`)."""
    return {"c": cfg.tis_c} if loss_name in ("seq_tis", "vcpo") else {}


def per_sample_scores(policy: Policy, params, tokens, mask):
    """s_i = grad_theta sum_t log pi(y_t) over the response tokens (the token-sum score), one vmapped backward
    pass: pytree with leading [B] axes; also the per-token log-probs [B, n] and entropies [B, n]."""

    def one(p, tok, m):
        logp, ent = policy.token_logp(p, tok[None])
        return jnp.sum(jnp.where(m[None] > 0, logp, 0.0)), (logp[0], ent[0])

    return jax.vmap(jax.grad(one, has_aux=True), (None, 0, 0))(params, tokens, mask)


def per_sample_grads(policy: Policy, loss_name: str, params, tokens, logp_mu, mask):
    """g_i = gradient of sample i's seq-TIS / REINFORCE loss with advantage 1, as a term of the batch loss
    (-min(w_i, c) (1/L_i) s_i / B), and ||s_i||^2 of the token-sum score (the official OPOB norm).
    Returns (g pytree [B, ...], ||s||^2 [B], log w [B], logp [B, n], entropy [B, n])."""
    scores, (logp, entropy) = per_sample_scores(policy, params, tokens, mask)
    log_w = jnp.sum(L.masked_log_ratio(logp, logp_mu, mask), -1)
    if loss_name == "reinforce":
        weight = jnp.ones_like(log_w)
    else:
        weight = jnp.exp(jnp.minimum(log_w, jnp.log(loss_kwargs(policy.cfg, loss_name)["c"])))
    coef = -weight / (jnp.maximum(jnp.sum(mask, -1), 1.0) * tokens.shape[0])
    grads = jax.tree.map(lambda s: coef.reshape(-1, *[1] * (s.ndim - 1)) * s, scores)
    return grads, _sq_norms(scores), log_w, logp, entropy


def _sq_norms(tree):
    return sum(jnp.sum(x.reshape(x.shape[0], -1) ** 2, -1) for x in jax.tree.leaves(tree))


def opob(cfg: SimConfig, rewards, log_w, s2, mask, group_ids):
    """The OPOB baseline [B] with the config's weighting, form and length normalisation."""
    return L.opob_baseline(rewards, log_w, s2, group_ids, num_groups=cfg.prompts_per_step,
                           weighting=cfg.opob_weighting, clip_c=cfg.tis_c, form=cfg.opob_form,
                           lengths=jnp.sum(mask, -1), normalize_by_length=cfg.opob_normalize_by_length)


class Steps(NamedTuple):
    """The two halves of one asynchronous RL step (`make_steps`), pure and jit-able; `make_train` scans them and
    `benchmarks/vcpo.py` times them separately.

    - `rollout(behaviour_params, k_prompt, k_roll) -> (tokens [B, 2n+1] int32, logp_mu [B, n] float32)`: sample
      `prompts_per_step` prompts, `group_size` responses each, from the behaviour parameters (the actor's work).
    - `learn(params, opt_state, tokens, logp_mu) -> (params, opt_state, metrics)`: one optimizer step of the
      method on that batch (the learner's work: rewards, advantages, gradient, ESS lr scale, Adam update).
    """

    policy: Policy
    tx: optax.GradientTransformation
    rollout: Callable
    learn: Callable


def make_steps(cfg: SimConfig, method: Method) -> Steps:
    """The rollout and learner step of `method` under `cfg` (see `Steps`)."""
    cfg.validate()
    policy = Policy(cfg)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(cfg.lr, weight_decay=cfg.weight_decay))
    n_prompts, g = cfg.prompts_per_step, cfg.group_size
    group_ids = jnp.repeat(jnp.arange(n_prompts), g)
    loss_kw = loss_kwargs(cfg, method.loss)

    def gradient(params, tokens, logp_mu, rewards, mask):
        group_mean, group_std = L.group_stats(rewards, group_ids, n_prompts)
        if method.advantage == "opob":
            grads, s2, log_w, logp, entropy = per_sample_grads(policy, method.loss, params, tokens, logp_mu, mask)
            b = opob(cfg, rewards, log_w, s2, mask, group_ids)
            adv = L.opob_advantages(rewards, b, group_ids, num_groups=n_prompts)
            std = group_std[::g]
            scale = 1.0 / jnp.where(std > 1e-8, std, 1.0)  # official: no division for a zero-variance group
            grad = L.two_sum_gradient(grads, rewards, b, group_ids, num_groups=n_prompts, group_scale=scale)
        else:
            if method.advantage == "opo":
                adv = L.opo_advantages(rewards, jnp.sum(mask, -1), group_ids, num_groups=n_prompts)
                b = rewards - adv
            else:
                b = group_mean
                adv = L.grpo_advantages(rewards, group_ids, num_groups=n_prompts)

            def loss_fn(p):
                logp, entropy = policy.token_logp(p, tokens)
                return L.LOSSES[method.loss](logp, logp_mu, mask, adv, **loss_kw)[0], (logp, entropy)

            grad, (logp, entropy) = jax.grad(loss_fn, has_aux=True)(params)
        loss, loss_metrics = L.LOSSES[method.loss](jax.lax.stop_gradient(logp), logp_mu, mask, adv, **loss_kw)
        metrics = dict(loss_metrics, loss=loss, entropy=jnp.mean(entropy), baseline_minus_mean=jnp.mean(b - group_mean))
        return grad, logp, metrics

    def rollout(behaviour, k_prompt, k_roll):
        prompts = jnp.repeat(sample_prompts(cfg, k_prompt, n_prompts), g, axis=0)
        return policy.rollout(behaviour, prompts, k_roll, noise=cfg.mismatch_noise)

    def learn(params, opt_state, tokens, logp_mu):
        rewards, mask = policy.rewards(tokens), policy.response_mask(tokens)
        grad, logp, metrics = gradient(params, tokens, logp_mu, rewards, mask)
        diag = L.is_diagnostics(logp, logp_mu, mask, c=cfg.tis_c)
        ess_key = "ess_ratio_clipped" if cfg.ess_use_clipped else ("ess_ratio" if cfg.ess_space == "linear"
                                                                     else "ess_ratio_log")
        scale = L.lr_scale(diag[ess_key], cfg.rho_on, method.lr_rule)
        updates, opt_state = tx.update(grad, opt_state, params)
        # Scaling the update (not the gradient) scales Adam's step and AdamW's weight decay alike.
        params = optax.apply_updates(params, jax.tree.map(lambda u: scale * u, updates))
        metrics.update(diag, reward=jnp.mean(rewards), grad_norm=optax.tree.norm(grad), lr_eff=cfg.lr * scale)
        return params, opt_state, metrics

    return Steps(policy, tx, rollout, learn)


def make_train(cfg: SimConfig, method: Method):
    """-> train(rng, lag) -> (per-step metrics [steps], greedy accuracy [steps // eval_every], final params,
    behaviour params of the last step)."""
    policy, tx, rollout, learn = make_steps(cfg, method)
    slots = cfg.max_lag + 1
    eval_prompts = sample_prompts(cfg, jax.random.PRNGKey(2**31 - 1), cfg.eval_prompts)  # same held-out set everywhere

    def step(carry, _):
        params, opt_state, snaps, t, lag, key = carry
        key, k_prompt, k_roll = jax.random.split(key, 3)
        snaps = jax.tree.map(lambda s, p: s.at[t % slots].set(p), snaps, params)
        # Slots not yet written still hold the initial parameters, so early steps read theta_0.
        behaviour = jax.tree.map(lambda s: s[(t - lag) % slots], snaps)
        tokens, logp_mu = rollout(behaviour, k_prompt, k_roll)
        params, opt_state, metrics = learn(params, opt_state, tokens, logp_mu)
        return (params, opt_state, snaps, t + 1, lag, key), metrics

    def chunk(carry, _):
        carry, metrics = jax.lax.scan(step, carry, None, length=cfg.eval_every)
        tokens, _ = policy.rollout(carry[0], eval_prompts, carry[-1], greedy=True)
        return carry, (metrics, jnp.mean(policy.rewards(tokens)))

    def train(rng, lag):
        k_init, k_loop = jax.random.split(rng)
        params = policy.init(k_init)
        snaps = jax.tree.map(lambda p: jnp.broadcast_to(p, (slots, *p.shape)), params)
        carry = (params, tx.init(params), snaps, jnp.int32(0), jnp.asarray(lag, jnp.int32), k_loop)
        carry, (metrics, accuracy) = jax.lax.scan(chunk, carry, None, length=cfg.steps // cfg.eval_every)
        params, _, snaps, t, lag, _ = carry
        metrics = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), metrics)
        behaviour = jax.tree.map(lambda s: s[(t - 1 - lag) % slots], snaps)
        return metrics, accuracy, params, behaviour

    return train


def run_grid(cfg: SimConfig, method: Method, lags, seeds):
    """All (lag, seed) cells of one method in one compiled, vmapped program. Returns numpy arrays with leading
    axes [len(lags), len(seeds)]: (metrics dict, greedy accuracy, final params, last behaviour params)."""
    lags, seeds = np.asarray(lags, np.int32), np.asarray(seeds, np.uint32)
    if lags.min() < 0 or lags.max() > cfg.max_lag:
        raise ValueError(f"lags must lie in [0, max_lag={cfg.max_lag}], got {lags.tolist()}")
    lag_grid = np.repeat(lags, len(seeds))
    keys = jax.vmap(jax.random.PRNGKey)(np.tile(seeds, len(lags)))
    out = jax.jit(jax.vmap(make_train(cfg, method)))(keys, lag_grid)
    return jax.tree.map(lambda x: np.asarray(x).reshape(len(lags), len(seeds), *x.shape[1:]), out)


def compare(a, b, floor: float = 0.02) -> tuple[str, float]:
    """Verdict of per-seed results `a` vs `b` (e.g. final accuracies [seeds]): "wins" / "ties" / "loses" by the mean
    gap, a tie when |gap| <= band = max(std(a), std(b), floor) (population std over seeds). Returns (word, band)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    gap, band = a.mean() - b.mean(), max(a.std(), b.std(), floor)
    return ("ties" if abs(gap) <= band else ("wins" if gap > 0 else "loses")), float(band)


def gradient_variance(cfg: SimConfig, params, behaviour, key, num_batches: int):
    """Monte-Carlo tr Var of the seq-TIS gradient estimator sum_i (R_i - b_i) g_i at frozen `params`, over
    `num_batches` batches sampled from `behaviour`, for baselines: none, group mean, OPOB (README and code weighting).
    No std normalisation, so only the baseline differs. Returns {name: tr Var}."""
    policy = Policy(cfg)
    n_prompts, g = cfg.prompts_per_step, cfg.group_size
    group_ids = jnp.repeat(jnp.arange(n_prompts), g)
    names = ("none", "group_mean", "opob_readme", "opob_code")

    def estimates(k):
        k_prompt, k_roll = jax.random.split(k)
        prompts = jnp.repeat(sample_prompts(cfg, k_prompt, n_prompts), g, axis=0)
        tokens, logp_mu = policy.rollout(behaviour, prompts, k_roll, noise=cfg.mismatch_noise)
        rewards, mask = policy.rewards(tokens), policy.response_mask(tokens)
        grads, s2, log_w, _, _ = per_sample_grads(policy, "vcpo", params, tokens, logp_mu, mask)
        baselines = [jnp.zeros_like(rewards), L.group_stats(rewards, group_ids, n_prompts)[0]]
        baselines += [opob(dataclasses.replace(cfg, opob_weighting=wt), rewards, log_w, s2, mask, group_ids)
                      for wt in ("readme", "code")]
        flat = jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(grads)], 1)
        return jnp.stack([jnp.einsum("i,ip->p", rewards - b, flat) for b in baselines])

    keys = jax.random.split(key, num_batches)
    shift = jax.jit(estimates)(keys[0])  # accumulate around a pilot estimate to limit float32 cancellation

    def acc(carry, k):
        d = estimates(k) - shift
        return (carry[0] + d, carry[1] + d**2), None

    zeros = jnp.zeros_like(shift)
    (s1, s2), _ = jax.jit(lambda ks: jax.lax.scan(acc, (zeros, zeros), ks))(keys)
    tr_var = jnp.sum(s2 / num_batches - (s1 / num_batches) ** 2, -1)
    return {name: float(v) for name, v in zip(names, tr_var, strict=True)}
