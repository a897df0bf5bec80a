"""VCPO losses, ESS scaling, OPOB and the two-sum gradient on a tabular softmax policy (CPU)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff import vcpo

T, A, P, G = 3, 4, 4, 8  # tokens per sequence, actions, prompts, group size


@pytest.fixture(scope="module")
def tabular():
    """Tabular policy: logits theta[prompt, position, action]; behaviour mu = perturbed theta; reward = fraction of
    positions equal to a target."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    theta = jax.random.normal(k1, (P, T, A)) * 1.5
    theta_mu = theta + 0.7 * jax.random.normal(k2, (P, T, A))
    target = jax.random.randint(k3, (P, T), 0, A)
    return theta, theta_mu, target


def _token_logp(th, prompts, acts):
    return jnp.take_along_axis(jax.nn.log_softmax(th[prompts], -1), acts[..., None], -1)[..., 0]


def _sample(key, theta, theta_mu, target):
    prompts = jnp.repeat(jnp.arange(P), G)
    acts = jax.random.categorical(key, theta_mu[prompts])
    rewards = jnp.mean((acts == target[prompts]).astype(jnp.float32), -1)
    logp_mu = _token_logp(theta_mu, prompts, acts)
    return prompts, acts, rewards, logp_mu


def _per_sample_scores(theta, prompts, acts):
    return jax.vmap(jax.grad(lambda th, p, a: jnp.sum(_token_logp(th, p, a))), (None, 0, 0))(theta, prompts, acts)


def test_opob_minimises_weighted_second_moment(tabular):
    theta, theta_mu, target = tabular
    prompts, acts, rewards, logp_mu = _sample(jax.random.PRNGKey(1), *tabular)
    log_w = jnp.sum(_token_logp(theta, prompts, acts) - logp_mu, -1)
    w = jnp.exp(log_w)
    s = _per_sample_scores(theta, prompts, acts)
    s2 = jnp.sum(s.reshape(s.shape[0], -1) ** 2, -1)
    b = vcpo.opob_baseline(rewards, log_w, s2, prompts, weighting="readme")
    grid = jnp.linspace(-0.5, 1.5, 401)
    for g in range(P):
        sel = prompts == g
        objective = jax.vmap(lambda c, sel=sel: jnp.sum(jnp.where(sel, w**2 * s2 * (rewards - c) ** 2, 0.0)))
        at_grid = objective(grid)
        at_opob = objective(b[sel][:1])[0]
        assert at_opob <= at_grid.min() + 1e-6
        assert abs(float(b[sel][0]) - float(grid[jnp.argmin(at_grid)])) <= float(grid[1] - grid[0])
    # The released code's weighting differs from the README's only through min(w, c)^2.
    np.testing.assert_allclose(
        vcpo.opob_log_weights(log_w, s2, weighting="code", clip_c=1.0),
        np.log(np.minimum(w, 1.0) ** 2 * w**2 * s2), rtol=1e-5, atol=1e-5)


def _official_opob(rewards, big_w, groups):
    """b*_g = sum W R / (sum W + 1e-8) in float64, as the official code forms it in Python floats."""
    rewards, big_w, groups = (np.asarray(x, np.float64) for x in (rewards, big_w, groups))
    out = np.zeros_like(rewards)
    for g in np.unique(groups):
        sel = groups == g
        out[sel] = np.sum(big_w[sel] * rewards[sel]) / (np.sum(big_w[sel]) + 1e-8)
    return out


def test_opob_official_eps_fallback_and_group_normalized_option():
    rewards = jnp.array([1.0, 0.0, 0.5, 1.0, 0.25, 0.75])
    groups = jnp.array([0, 0, 0, 1, 1, 1])
    log_w = jnp.array([0.3, -0.2, 0.1, 2.0, -1.0, 0.0])
    for scale in (1.0, 1e-7, 1e-9, 1e-12):  # W comparable to, and far below, the absolute eps
        s2 = jnp.array([2.0, 1.0, 3.0, 0.5, 4.0, 1.0]) * scale
        big_w = np.exp(2 * np.asarray(log_w, np.float64)) * np.asarray(s2, np.float64)
        got = vcpo.opob_baseline(rewards, log_w, s2, groups, weighting="readme")
        np.testing.assert_allclose(got, _official_opob(rewards, big_w, groups), rtol=1e-5, atol=1e-12)
        # Group-normalised option: scale-free, the eps-free weighted mean at every scale.
        norm = vcpo.opob_baseline(rewards, log_w, s2, groups, weighting="readme", form="group_normalized")
        np.testing.assert_allclose(norm, _official_opob(rewards, big_w / big_w.max(), groups), rtol=1e-5)
    # Tiny W: the official b* collapses toward 0.
    assert np.abs(np.asarray(vcpo.opob_baseline(rewards, log_w, jnp.full(6, 1e-16), groups))).max() < 1e-2
    # W = e^120 overflows float32 but the official float64 value is the plain weighted mean: no inf, no NaN.
    huge = vcpo.opob_baseline(rewards, jnp.array([60.0, 59.0, 0.0, 0.0, 0.0, 0.0]), jnp.ones(6), groups,
                              weighting="readme")
    expect = (1.0 * 1 + 0.0 * np.exp(-2)) / (1 + np.exp(-2))
    assert float(huge[0]) == pytest.approx(expect, rel=1e-5)
    # All-zero W in group 0: official fallback 0; group-normalised fallback: the reward mean.
    s2 = jnp.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(vcpo.opob_baseline(rewards, log_w, s2, groups)[:3], 0.0)
    np.testing.assert_allclose(vcpo.opob_baseline(rewards, log_w, s2, groups, form="group_normalized")[:3], 0.5)
    with pytest.raises(ValueError, match="form"):
        vcpo.opob_baseline(rewards, log_w, s2, groups, form="paper")
    with pytest.raises(ValueError, match="lengths"):
        vcpo.opob_baseline(rewards, log_w, s2, groups, normalize_by_length=True)


def test_opob_token_sum_vs_token_mean_norm_differ_by_length_squared():
    rewards = jnp.array([1.0, 0.0, 0.5, 0.25])
    groups = jnp.array([0, 0, 0, 0])
    log_w = jnp.array([0.2, -0.1, 0.0, 0.4])
    s2_sum = jnp.array([4.0, 9.0, 1.0, 16.0])  # ||grad sum_t log pi||^2
    lengths = jnp.array([2, 6, 1, 8])
    token_sum = vcpo.opob_baseline(rewards, log_w, s2_sum, groups, lengths=lengths)  # official default
    token_mean = vcpo.opob_baseline(rewards, log_w, s2_sum, groups, lengths=lengths, normalize_by_length=True)
    by_hand = vcpo.opob_baseline(rewards, log_w, s2_sum / lengths.astype(jnp.float32) ** 2, groups)
    np.testing.assert_allclose(token_mean, by_hand, rtol=1e-5)
    assert abs(float(token_sum[0] - token_mean[0])) > 0.05  # variable lengths: the norm choice matters


def _estimator(key, theta, theta_mu, target, baseline):
    prompts, acts, rewards, logp_mu = _sample(key, theta, theta_mu, target)
    w = jnp.exp(jnp.sum(_token_logp(theta, prompts, acts) - logp_mu, -1))
    s = _per_sample_scores(theta, prompts, acts)
    if baseline == "none":
        b = jnp.zeros_like(rewards)
    elif baseline == "group_mean":
        b = vcpo.group_stats(rewards, prompts, P)[0]
    else:
        b = vcpo.opob_baseline(rewards, jnp.log(w), jnp.sum(s.reshape(s.shape[0], -1) ** 2, -1), prompts,
                               num_groups=P, weighting="readme")
    return jnp.einsum("i,i...->...", w * (rewards - b), s) / rewards.shape[0]


def test_opob_has_lowest_monte_carlo_gradient_variance(tabular):
    keys = jax.random.split(jax.random.PRNGKey(2), 2000)
    tr_var = {}
    for baseline in ("none", "group_mean", "opob"):
        grads = jax.jit(jax.vmap(lambda k, b=baseline: _estimator(k, *tabular, b)))(keys)
        tr_var[baseline] = float(jnp.sum(jnp.var(grads, 0)))
    assert tr_var["opob"] < tr_var["group_mean"] < tr_var["none"], tr_var


def _official_ess(log_w):
    """compute_ess_info: float32 exp, then Python-float sums with the absolute 1e-8."""
    w = np.exp(np.asarray(log_w, np.float32)).astype(np.float64)
    return w.sum() ** 2 / (len(w) * ((w**2).sum() + 1e-8))


def test_ess_ratio_official_linear_space_and_log_space_diagnostic():
    for space in ("linear", "log"):
        assert float(vcpo.ess_ratio(jnp.full((8,), 0.3), space=space)) == pytest.approx(1.0, rel=1e-6)
        one_hot = jnp.array([0.0] + [-1e4] * 7)
        assert float(vcpo.ess_ratio(one_hot, space=space)) == pytest.approx(1 / 8, rel=1e-6)
    rng = np.random.default_rng(0)
    for log_w in (rng.normal(0, 2, 64), rng.normal(30, 5, 64), np.array([60.0, 59.0, 0.0]),
                  np.full(512, np.log(1e-6)), np.array([-5.0, -20.0, -21.0])):
        got = float(vcpo.ess_ratio(jnp.asarray(log_w, jnp.float32)))
        assert got == pytest.approx(_official_ess(log_w), rel=1e-4), log_w[:3]
    # Official underflow regime: all w = 1e-6, B = 512 -> the eps pulls the ratio to ~0.05 (log space: 1).
    tiny = jnp.full((512,), np.log(1e-6), jnp.float32)
    assert float(vcpo.ess_ratio(tiny)) == pytest.approx(512e-12 / (512e-12 + 1e-8), rel=1e-3)
    assert float(vcpo.ess_ratio(tiny, space="log")) == pytest.approx(1.0, rel=1e-6)
    # Every w underflowed to 0: the official ratio is 0.
    assert float(vcpo.ess_ratio(jnp.full((4,), -200.0))) == 0.0
    # One overflowing weight (log w > 88.7): official inf/inf = NaN, whose lr rule min(1, nan) applies no damping.
    over = jnp.array([100.0] + [0.0] * 7)
    assert float(vcpo.ess_ratio(over)) == pytest.approx(1 / 8, rel=1e-6)  # default: the true ratio
    assert float(vcpo.ess_ratio(over, overflow="official_nan")) == 1.0
    assert float(vcpo.lr_scale(vcpo.ess_ratio(over, overflow="official_nan"))) == 1.0
    # Masked entries are ignored.
    log_w = jnp.array([800.0, 800.0, 5.0, 0.0])
    assert float(vcpo.ess_ratio(log_w, mask=jnp.array([1, 1, 0, 0]))) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="space"):
        vcpo.ess_ratio(log_w, space="log2")


def test_lr_scale_rules():
    rho = jnp.array([0.01, 0.25, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(vcpo.lr_scale(rho), np.sqrt(np.minimum(1, np.asarray(rho))), rtol=1e-6)
    np.testing.assert_allclose(vcpo.lr_scale(rho, rho_on=0.5, rule="linear"), np.minimum(1, np.asarray(rho) / 0.5))
    np.testing.assert_allclose(vcpo.lr_scale(rho, rule="none"), np.ones(5))
    with pytest.raises(ValueError, match="lr rule"):
        vcpo.lr_scale(rho, rule="cube")
    with pytest.raises(ValueError, match="rho_on"):
        vcpo.lr_scale(rho, rho_on=0.0)


def test_two_sum_gradient_equals_direct(tabular):
    theta, _, _ = tabular
    prompts, acts, rewards, logp_mu = _sample(jax.random.PRNGKey(3), *tabular)
    mask = jnp.ones(acts.shape)
    logp_now = _token_logp(theta, prompts, acts)
    w = jnp.exp(jnp.sum(logp_now - logp_mu, -1))

    def per_traj_loss(th, p, a, lmu):  # seq-TIS loss of one trajectory with advantage 1
        lp = _token_logp(th, p[None], a[None])
        loss, _ = vcpo.LOSSES["vcpo"](lp, lmu[None], jnp.ones_like(lp), jnp.ones((1,)))
        return loss / rewards.shape[0]

    g = jax.vmap(jax.grad(per_traj_loss), (None, 0, 0, 0))(theta, prompts, acts, logp_mu)
    s2 = jnp.sum(g.reshape(g.shape[0], -1) ** 2, -1)
    b = vcpo.opob_baseline(rewards, jnp.log(w), s2, prompts)
    _, std = vcpo.group_stats(rewards, prompts)
    scale = 1 / jnp.where(std[::G] > 1e-8, std[::G], 1.0)
    two_sum = vcpo.two_sum_gradient(g, rewards, b, prompts, num_groups=P, group_scale=scale)
    adv = vcpo.opob_advantages(rewards, b, prompts)
    direct = jax.grad(lambda th: vcpo.LOSSES["vcpo"](_token_logp(th, prompts, acts), logp_mu, mask, adv)[0])(theta)
    np.testing.assert_allclose(two_sum, direct, rtol=1e-4, atol=1e-6)


# Tiny batch: two sequences of two tokens, the second sequence's last token masked.
LOGP = [[-1.0, -2.0], [-0.5, -1.5]]
LOGP_MU = [[-1.5, -1.85], [-0.2, -0.4]]
MASK = [[1.0, 1.0], [1.0, 0.0]]
ADV = [1.0, -2.0]


def _hand_loss(name):
    """Each loss written out with Python scalars, token by token."""
    toks = [[(LOGP[i][t], LOGP_MU[i][t]) for t in range(2) if MASK[i][t]] for i in range(2)]

    def tok_loss(f):
        return sum(sum(f(lp, mu, ADV[i]) for lp, mu in toks[i]) / len(toks[i]) for i in range(2)) / 2

    def seq_w(i):
        return math.exp(sum(lp - mu for lp, mu in toks[i]))

    def mean_lp(i):
        return sum(lp for lp, _ in toks[i]) / len(toks[i])

    r = lambda lp, mu: math.exp(lp - mu)  # noqa: E731
    clip = lambda x, lo, hi: min(max(x, lo), hi)  # noqa: E731
    if name == "reinforce":
        return tok_loss(lambda lp, mu, a: -a * lp)
    if name == "ppo_clip":
        return tok_loss(lambda lp, mu, a: -min(r(lp, mu) * a, clip(r(lp, mu), 0.8, 1.2) * a))
    if name == "token_tis":
        return tok_loss(lambda lp, mu, a: -min(r(lp, mu), 2.0) * a * lp)
    if name in ("seq_tis", "vcpo"):
        return sum(-min(seq_w(i), 8.0) * ADV[i] * mean_lp(i) for i in range(2)) / 2
    geo = [math.exp(sum(lp - mu for lp, mu in toks[i]) / len(toks[i])) for i in range(2)]
    seq_keep = {"seq_mis": [0.5 <= seq_w(i) <= 2.0 for i in range(2)],
                "geo_mis": [1 / 1.001 <= geo[i] <= 1.001 for i in range(2)]}
    if name == "token_mis":  # verl: rejected tokens leave the token mean (here every token is kept)
        kept = [[(lp, mu) for lp, mu in toks[i] if 0.5 <= r(lp, mu) <= 5.0] for i in range(2)]
        per_seq = [sum(-ADV[i] * lp for lp, _ in kept[i]) / len(kept[i]) for i in range(2) if kept[i]]
        return sum(per_seq) / max(len(per_seq), 1)
    if name == "token_mis_is":
        return tok_loss(lambda lp, mu, a: -(r(lp, mu) if 0.5 <= r(lp, mu) <= 5.0 else 0.0) * a * lp)
    if name in ("seq_mis", "geo_mis"):  # verl: rejected sequences leave the sequence mean
        kept = [i for i in range(2) if seq_keep[name][i]]
        return sum(-ADV[i] * mean_lp(i) for i in kept) / max(len(kept), 1)
    if name in ("seq_mis_is", "geo_mis_is"):
        keep = seq_keep[name[:-3]]
        return sum(-(seq_w(i) if keep[i] else 0.0) * ADV[i] * mean_lp(i) for i in range(2)) / 2
    if name == "m2po":
        # (log r)^2 = 0.25, 0.0225, 0.09: dropping the largest leaves mean 0.056 > 0.04; dropping two leaves 0.0225.
        kept = {(0, 1)}
        return sum(sum(-r(lp, mu) * ADV[i] for t, (lp, mu) in enumerate(toks[i]) if (i, t) in kept) / len(toks[i])
                   for i in range(2)) / 2
    if name == "gspo":
        s = [math.exp(sum(lp - mu for lp, mu in toks[i]) / len(toks[i])) for i in range(2)]
        return sum(-min(s[i] * ADV[i], clip(s[i], 1 - 3e-4, 1 + 4e-4) * ADV[i]) for i in range(2)) / 2
    if name == "cispo":
        return tok_loss(lambda lp, mu, a: -clip(r(lp, mu), 0.0, 1.28) * a * lp)
    if name == "areal":  # proximal policy = current policy: u = 1, so the loss is -(pi/mu) A
        return tok_loss(lambda lp, mu, a: -r(lp, mu) * a)
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(vcpo.LOSSES))
def test_loss_matches_hand_computation(name):
    args = (jnp.array(LOGP), jnp.array(LOGP_MU), jnp.array(MASK), jnp.array(ADV))
    loss, metrics = jax.jit(vcpo.LOSSES[name])(*args)
    assert float(loss) == pytest.approx(_hand_loss(name), rel=1e-5, abs=1e-6)
    assert set(metrics) == {"frac_clipped", "weight_mean"}


def test_bad_input_raises_and_jit_stays_finite():
    logp = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="shape"):
        vcpo.LOSSES["seq_tis"](logp, jnp.zeros((2, 4)), jnp.ones((2, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match="adv"):
        vcpo.LOSSES["reinforce"](logp, logp, jnp.ones((2, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match="no token"):
        vcpo.LOSSES["ppo_clip"](logp, logp, jnp.zeros((2, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match="empty group"):
        vcpo.opob_baseline(jnp.ones(3), jnp.zeros(3), jnp.ones(3), jnp.array([0, 0, 2]))
    with pytest.raises(ValueError, match="shape"):
        vcpo.opob_baseline(jnp.ones(3), jnp.zeros(2), jnp.ones(3), jnp.array([0, 0, 1]))
    with pytest.raises(ValueError, match="no sequence"):
        vcpo.ess_ratio(jnp.zeros(3), mask=jnp.zeros(3))
    with pytest.raises(ValueError, match="weighting"):
        vcpo.opob_log_weights(jnp.zeros(2), jnp.ones(2), weighting="paper")
    with pytest.raises(ValueError, match="bounds"):
        vcpo.LOSSES["seq_mis"](logp, logp, jnp.ones((2, 3)), jnp.ones(2), low=3.0, high=2.0)
    # Under jit the values can't be checked; the same degenerate inputs give finite numbers.
    for name, fn in vcpo.LOSSES.items():
        loss, metrics = jax.jit(fn)(logp, logp, jnp.zeros((2, 3)), jnp.ones(2))
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values()), name
    assert float(jax.jit(vcpo.ess_ratio)(jnp.zeros(3), jnp.zeros(3))) == 0.0
    opob = jax.jit(vcpo.opob_baseline, static_argnames="num_groups")
    zero_weights = opob(jnp.ones(2), jnp.full(2, -jnp.inf), jnp.zeros(2), jnp.array([0, 1]), num_groups=2)
    assert np.isfinite(np.asarray(zero_weights)).all()


def test_diagnostics_and_m2po_mask():
    log_r = jnp.array([[0.5, -0.15], [-0.3, 7.0]])
    keep = vcpo.m2po_keep_mask(log_r, jnp.array(MASK), tau=0.04)
    np.testing.assert_array_equal(keep, [[0, 1], [0, 0]])
    d = vcpo.is_diagnostics(jnp.array(LOGP), jnp.array(LOGP_MU), jnp.array(MASK))
    w = np.exp([0.35, -0.3])
    assert float(d["ess_ratio"]) == pytest.approx(w.sum() ** 2 / (2 * (w**2).sum()), rel=1e-5)
    assert float(d["max_w_frac"]) == pytest.approx(w.max() / w.sum(), rel=1e-5)
    k3 = [math.exp(x) - 1 - x for x in (0.5, -0.15, -0.3)]
    assert float(d["kl_mu_pi_k3"]) == pytest.approx(sum(k3) / 3, rel=1e-5)
    assert float(d["kl_mu_pi_k3"]) > 0


def test_mis_baselines_are_pure_rejection_masks_by_default():
    """verl rollout_rs: kept samples are not multiplied by their weight; the IS-weighted variants are."""
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    logp_mu = logp - jnp.array([[0.3, 0.2, 0.0]])  # r = e^0.3, e^0.2, 1: all kept; w = e^0.5
    mask, adv = jnp.ones((1, 3)), jnp.array([2.0])
    plain = float(vcpo.LOSSES["reinforce"](logp, logp_mu, mask, adv)[0])
    for name in ("token_mis", "seq_mis"):
        assert float(vcpo.LOSSES[name](logp, logp_mu, mask, adv)[0]) == pytest.approx(plain, rel=1e-6)
    weighted = float(vcpo.LOSSES["seq_mis_is"](logp, logp_mu, mask, adv)[0])
    assert weighted == pytest.approx(math.exp(0.5) * plain, rel=1e-5)
    # verl's lower bound defaults to 1 / upper: w = e^0.5 = 1.65 is rejected by high = 1.5;
    # w = e^-2.5 by the default low = 1 / 1.2, kept with low = 0.01.
    assert float(vcpo.LOSSES["seq_mis"](logp, logp_mu, mask, adv, high=1.5)[0]) == 0.0
    assert float(vcpo.LOSSES["seq_mis"](logp, logp_mu + 1.0, mask, adv, high=1.2)[0]) == 0.0
    assert float(vcpo.LOSSES["seq_mis"](logp, logp_mu + 1.0, mask, adv, low=0.01, high=1.2)[0]) != 0.0


# ------------------------------------------------------------------------------------------- numerical edges
# The cases of issue 16: one token with a log-ratio of about 100 (exp overflows float32).
EDGE_LOGP = [[-1.0, -1e-4]]
EDGE_MU = [[-1.0, -100.0001]]


@pytest.mark.parametrize("log_ratio", [50.0, 100.0])
def test_huge_log_ratio_token_or_sequence_is_dropped_not_nan(log_ratio):
    logp = jnp.array(EDGE_LOGP)
    logp_mu = jnp.array([[-1.0, -1e-4 - log_ratio]])
    mask, adv = jnp.ones((1, 2)), jnp.ones(1)
    expect = {
        "token_mis": 1.0,  # verl: the rejected token leaves the token mean, -A log pi of token 1 = 1
        "token_mis_is": 0.5,  # weighted variant: token 1 (r = 1) over the original 2 tokens
        "m2po": -0.5,  # (log r)^2 = 0, 2500+: the second token is dropped, -r A = -1 over 2 tokens
        "seq_mis": 0.0, "geo_mis": 0.0, "seq_mis_is": 0.0, "geo_mis_is": 0.0,  # the sequence is rejected
        "ppo_clip": -1.1,  # -(1 + 1.2) / 2: the second token is clipped at 1 + eps
    }
    for name, value in expect.items():
        loss, grad = jax.jit(jax.value_and_grad(lambda lp, n=name: vcpo.LOSSES[n](lp, logp_mu, mask, adv)[0]))(logp)
        assert float(loss) == pytest.approx(value, rel=1e-5, abs=1e-6), name
        assert np.isfinite(np.asarray(grad)).all(), name


def test_masked_huge_log_ratio_token_never_contributes():
    logp, logp_mu = jnp.array(EDGE_LOGP), jnp.array(EDGE_MU)
    mask, adv = jnp.array([[1.0, 0.0]]), jnp.ones(1)
    expect = {"token_mis": 1.0, "token_mis_is": 1.0, "m2po": -1.0, "areal": -1.0, "ppo_clip": -1.0}
    for name, value in expect.items():
        loss, grad = jax.value_and_grad(lambda lp, n=name: vcpo.LOSSES[n](lp, logp_mu, mask, adv)[0])(logp)
        assert float(loss) == pytest.approx(value, rel=1e-5), name
        assert float(grad[0, 1]) == 0.0, name
    grad = jax.grad(lambda lp: vcpo.LOSSES["ppo_clip"](lp, logp_mu, mask, adv)[0])(logp)
    np.testing.assert_allclose(grad, [[-1.0, 0.0]], rtol=1e-6)
    # Zero advantage: 0 * inf was NaN in ppo_clip; the loss is 0 with a zero gradient.
    loss, grad = jax.value_and_grad(lambda lp: vcpo.LOSSES["ppo_clip"](lp, logp_mu, jnp.ones((1, 2)),
                                                                       jnp.zeros(1))[0])(logp)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


def _extreme_batches():
    """(name, logp, logp_mu, mask, adv) with B = 4, T = 3: huge / tiny log-ratios, an all-masked row, zero and
    huge advantages, a masked token hiding an extreme log-ratio."""
    base = np.array([[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.0], [-2.0, -0.1, -0.7], [-0.2, -0.9, -3.0]], np.float32)
    full, adv = np.ones((4, 3), np.float32), np.array([1.0, -2.0, 0.5, -0.5], np.float32)
    ragged = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], np.float32)  # row 2 all masked
    out = []
    for delta in (1e4, 300.0, 100.0, 45.0, -45.0, -100.0, -1e4):
        d = np.full((4, 3), delta, np.float32)
        mixed = d * np.array([[1, 0, -1]], np.float32)
        out += [(f"all {delta}", base, base - d, full, adv), (f"mixed {delta}", base, base - mixed, full, adv),
                (f"ragged {delta}", base, base - d, ragged, adv), (f"zero adv {delta}", base, base - d, full, 0 * adv)]
    out += [("on-policy", base, base, full, adv), ("huge adv", base, base - 0.5, full, adv * 1e3),
            ("tiny logp", base * 1e3, base * 1e3 + 60.0, ragged, adv)]
    return out


@pytest.mark.parametrize("name", sorted(vcpo.LOSSES))
def test_every_loss_finite_values_and_gradients_at_extremes(name):
    def f(lp, mu, m, a):
        loss, metrics = vcpo.LOSSES[name](lp, mu, m, a)
        return loss, metrics

    value_and_grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3), has_aux=True))
    for case, lp, mu, m, a in _extreme_batches():
        (loss, metrics), grads = value_and_grad(jnp.asarray(lp), jnp.asarray(mu), jnp.asarray(m), jnp.asarray(a))
        assert np.isfinite(float(loss)), (name, case)
        assert all(np.isfinite(float(v)) for v in metrics.values()), (name, case, metrics)
        for g in grads:
            assert np.isfinite(np.asarray(g)).all(), (name, case)
        # Masked tokens never contribute: no gradient reaches them ...
        assert np.all(np.asarray(grads[0])[m == 0] == 0.0), (name, case)
        # ... and changing them (to other extremes) changes nothing.
        lp2, mu2 = np.where(m > 0, lp, 7.0), np.where(m > 0, mu, -500.0)
        (loss2, _), grads2 = value_and_grad(jnp.asarray(lp2), jnp.asarray(mu2), jnp.asarray(m), jnp.asarray(a))
        assert float(loss2) == pytest.approx(float(loss), rel=1e-6, abs=1e-7), (name, case)
        np.testing.assert_allclose(np.asarray(grads2[0])[m > 0], np.asarray(grads[0])[m > 0], rtol=1e-5, atol=1e-7)


def test_advantages_baselines_and_diagnostics_finite_at_extremes():
    groups = jnp.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    rewards = jnp.array([1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0])  # groups 0 and 2 have zero variance
    np.testing.assert_allclose(np.asarray(vcpo.grpo_advantages(rewards, groups))[[0, 6]], 0.0)
    baselines = [jax.jit(lambda lw, s2, f=form, w=weighting, n=norm: vcpo.opob_advantages(
        rewards, vcpo.opob_baseline(rewards, lw, s2, groups, num_groups=3, form=f, weighting=w,
                                    lengths=jnp.arange(1, 10), normalize_by_length=n), groups, num_groups=3))
        for form in vcpo.OPOB_FORMS for weighting in vcpo.OPOB_WEIGHTINGS for norm in (False, True)]
    ess = [jax.jit(functools.partial(vcpo.ess_ratio, space=space, overflow=overflow))
           for space in vcpo.ESS_SPACES for overflow in vcpo.ESS_OVERFLOW]
    for log_w in (jnp.zeros(9), jnp.full(9, 1e4), jnp.full(9, -1e4), jnp.array([1e4, -1e4, 0.0] * 3),
                  jnp.array([100.0, 45.0, -45.0, -100.0, 0.0, 3.0, -1e30, 1e30, 0.0])):
        for s2 in (jnp.ones(9), jnp.zeros(9), jnp.full(9, 1e-30), jnp.full(9, 1e30)):
            for adv_fn in baselines:
                adv = np.asarray(adv_fn(log_w, s2))
                # b* is a (shrunk) weighted mean of rewards in [0, 1], so |R - b*| <= 1; only group 1 is divided
                # by its std.
                assert np.isfinite(adv).all() and np.abs(adv).max() <= 1 / np.std([0.0, 0.5, 1.0]) + 1e-4
        for ess_fn in ess:
            rho = float(ess_fn(log_w))
            assert np.isfinite(rho) and 0.0 <= rho <= 1.0 + 1e-6
            assert np.isfinite(float(vcpo.lr_scale(rho)))
    assert np.isfinite(np.asarray(vcpo.opo_advantages(rewards, jnp.zeros(9), groups))).all()
    diagnostics = jax.jit(vcpo.is_diagnostics)
    for case, lp, mu, m, _ in _extreme_batches():
        d = diagnostics(jnp.asarray(lp), jnp.asarray(mu), jnp.asarray(m))
        assert all(np.isfinite(float(v)) for v in d.values()), (case, d)


def test_unknown_registry_names_raise_value_error_listing_the_known_ones():
    from jaxeff.vcpo import sim

    for registry, known in ((vcpo.LOSSES, "vcpo"), (sim.METHODS, "vcpo_no_opob")):
        with pytest.raises(ValueError, match=rf"unknown .* 'sgd'; known: \[.*'{known}'") as info:
            registry["sgd"]
        assert isinstance(info.value, KeyError)  # `in`, `.get` and `except KeyError` still work
        assert "sgd" not in registry and registry.get("sgd") is None and known in registry
        with pytest.raises(ValueError, match="unknown"):
            registry[["unhashable"]]
    with pytest.raises(ValueError, match="unknown loss 'sgd'"):  # at config time, before anything compiles
        sim.Method("sgd")
    with pytest.raises(ValueError, match="unknown advantage"):
        sim.Method("vcpo", "rloo")
    with pytest.raises(ValueError, match="unknown lr rule"):
        sim.Method("vcpo", "opob", "cosine")
