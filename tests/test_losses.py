"""Properties of the KL terms, the discretized decoder, the prior term and the training losses.

References are float64 numpy / scipy from the papers' formulas and the betas alone. Tolerances
are forward error bounds of the float32 evaluation: with u = 2^-24, each rounded operation adds
at most u relative, and a term passes through at most ~6 of them (stored coefficient, input,
product, sum, a division evaluated as reciprocal and product): ``TOL32 = 8u`` per term.
Where an input's rounding is amplified (a log-probability in a steep tail, a KL of nearly equal
means), the bound is the float64 reference's own change under that perturbation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from diffjax.core import losses as L
from diffjax.core.diffusion import MEAN_TYPES, VAR_TYPES
from diffjax.core.schedules import Schedule, get_betas, make_schedule

U = 2.0**-24
TOL32 = 8 * U
LN2 = np.log(2.0)
H = 1.0 / 255.0  # half a bin of 8-bit data on [-1, 1]
T = 1000
B = 4
SHAPE = (B, 4, 4, 3)  # [B, H, W, C]
BETAS = get_betas("linear", T)
SCHED = make_schedule("linear", T)
SHORT_BETAS = get_betas("cosine", 50)
SHORT_SCHED = make_schedule("cosine", 50)
GRID = np.linspace(-1.0, 1.0, 256).astype(np.float32).astype(np.float64)  # the 8-bit values
SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def assert_within(got, want, tol, what=""):
    got, want, tol = np.broadcast_arrays(f64(got), want, tol)
    err = np.abs(got - want)
    i = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), f"{what}: |{got[i]} - {want[i]}| > tol {tol[i]:.3g} at {i}"


# --- float64 references ---------------------------------------------------------------------------


def ref_kl(m1, lv1, m2, lv2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
    s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
    return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def kl_tol(m1, lv1, m2, lv2, d_mean=0.0, d_lv=0.0):
    """Bound on the float32 error of the elementwise KL, given errors of its inputs.

    The variance part (a few O(|logvar|) terms and an exp) is good to ~4u of its terms; the
    rounding of d = lv1 - lv2 (u |d|) and the inputs' errors d_lv reach it through exp's slope
    exp(d). The mean part (m1 - m2)^2 exp(-lv2)
    takes ~6 roundings (difference, square, exp, product) relative to itself, and the means'
    own errors d_mean enter through the square: (|m1 - m2| + d_mean)^2 - (m1 - m2)^2.
    """
    r = np.exp(lv1 - lv2)
    dm = np.abs(m1 - m2)
    var_part = (
        TOL32 * (1 + np.abs(lv1) + np.abs(lv2) + r * (1 + np.abs(lv1 - lv2))) + (1 + r) * d_lv
    )
    mean_part = np.exp(-lv2) * (dm**2 * (2 * TOL32 + d_lv) + (2 * dm + d_mean) * d_mean)
    return 0.5 * (var_part + mean_part)


def ref_disc_loglik(x, m, s):
    """log P(bin of x) under N(m, s^2): the bin x +- 1/255, edge bins open (Ho et al. eq. 13).

    log(Phi(u) - Phi(l)) = log Phi(u) + log(1 - Phi(l) / Phi(u)) below the mean, with survival
    functions above it, so that neither tail cancels in float64 (checked against mpmath).
    """
    x, m, s = np.broadcast_arrays(f64(x), f64(m), f64(s))
    hi, lo = (x + H - m) / s, (x - H - m) / s  # standardized bin edges
    with np.errstate(divide="ignore", invalid="ignore"):
        below = norm.logcdf(hi) + np.log(-np.expm1(norm.logcdf(lo) - norm.logcdf(hi)))
        above = norm.logsf(lo) + np.log(-np.expm1(norm.logsf(hi) - norm.logsf(lo)))
    inner = np.where(x - m <= 0, below, above)
    return np.where(x < -0.999, norm.logcdf(hi), np.where(x > 0.999, norm.logsf(lo), inner))


def disc_tol(x, m, s, d_mean=0.0, d_scale=0.0):
    """Bound on the float32 error of discretized_gaussian_log_likelihood.

    Input rounding: computing x - m +- 1/255 and scaling by exp(-log s) moves the bin edges
    like perturbing m by 4u (|x| + |m| + 1/255) and s by 4u relative; their effect is read off
    the float64 reference. Evaluation: each float32 CDF value (taken in the lower tail) is good
    to a few u of itself, and the bin mass is their difference, so the log-mass is good to
    ~u (Phi(a) + Phi(b)) / mass, times (1 + |log Phi|) when it is formed from log CDFs.
    """
    x, m, s = np.broadcast_arrays(f64(x), f64(m), f64(s))
    ref = ref_disc_loglik(x, m, s)
    dm = TOL32 * (np.abs(x) + np.abs(m) + H) + d_mean
    ds = TOL32 + d_scale
    sens = sum(
        np.abs(ref_disc_loglik(x, mm, ss) - ref)
        for mm, ss in ((m + dm, s), (m - dm, s), (m, s * (1 + ds)), (m, s * (1 - ds)))
    )
    hi, lo = (x + H - m) / s, (x - H - m) / s
    below = x - m <= 0
    log_a = np.where(below, norm.logcdf(lo), norm.logsf(hi))  # the smaller lower-tail CDF
    log_b = np.where(below, norm.logcdf(hi), norm.logsf(lo))
    edge = (x < -0.999) | (x > 0.999)
    with np.errstate(over="ignore"):
        cond = np.where(edge, 0.0, np.exp(np.logaddexp(log_a, log_b) - ref) * (1 - log_b))
    return sens + 2 * TOL32 * (1 + np.abs(ref) + cond)


class Ref:
    """Float64 coefficients at t, shaped [B, 1, 1, 1], from the betas (Ho et al. eq. 4, 7)."""

    def __init__(self, betas, t, ndim=4):
        b = np.asarray(betas, np.float64)
        abar = np.cumprod(1 - b)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        btilde = b * (1 - abar_prev) / (1 - abar)
        shape = (len(t),) + (1,) * (ndim - 1)
        g = lambda a: a[np.asarray(t)].reshape(shape)
        self.t, self.beta, self.abar = g(np.arange(len(b))), g(b), g(abar)
        self.c1 = g(b * np.sqrt(abar_prev) / (1 - abar))  # multiplies x_0
        self.c2 = g((1 - abar_prev) * np.sqrt(1 - b) / (1 - abar))  # multiplies x_t
        # beta tilde with its first (zero) entry replaced by the second one's, for the logs.
        self.log_btc = g(np.log(np.concatenate([[btilde[1]], btilde[1:]])))
        self.log_beta = g(np.log(b))

    def x0_hat(self, mean_type, out, x_t):
        sa, s1a = np.sqrt(self.abar), np.sqrt(1 - self.abar)
        return {"eps": (x_t - s1a * out) / sa, "x0": out, "v": sa * x_t - s1a * out}[mean_type]

    def x0_hat_error(self, mean_type, out, x_t):
        sa, s1a = np.sqrt(self.abar), np.sqrt(1 - self.abar)
        # x_t itself comes from q_sample in float32: its error enters scaled like x_t.
        e_xt = TOL32 * (np.abs(x_t) + 1)
        return {
            "eps": TOL32 * (np.abs(x_t) + s1a * np.abs(out)) / sa + e_xt / sa,
            "x0": 0.0 * out,
            "v": TOL32 * (sa * np.abs(x_t) + s1a * np.abs(out)) + sa * e_xt,
        }[mean_type]

    def model_log_var(self, var_type, extra=None):
        if var_type == "fixed_small":
            return self.log_btc
        if var_type == "fixed_large":
            return np.where(self.t == 0, self.log_btc, self.log_beta)
        f = (extra + 1) / 2  # Nichol & Dhariwal 2021 eq. 15
        return f * self.log_beta + (1 - f) * self.log_btc


def grid_x0(seed, shape=SHAPE):
    """8-bit data scaled to [-1, 1], with the edge values well represented."""
    k = np.random.default_rng(seed).integers(-20, 276, shape).clip(0, 255)
    x = (k / 127.5 - 1).astype(np.float32)
    return jnp.asarray(x), f64(x)


def normal(seed, shape=SHAPE, scale=1.0):
    x = (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)
    return jnp.asarray(x), f64(x)


def ref_vlb_bpd(r, mean_type, var_type, x0, eps, out, extra=None):
    """L_{t-1} (t > 0) or the decoder NLL L_0 (t = 0), per example in bits/dim, plus a bound."""
    x_t = np.sqrt(r.abar) * x0 + np.sqrt(1 - r.abar) * eps
    x0_hat = r.x0_hat(mean_type, out, x_t)
    e_x0 = r.x0_hat_error(mean_type, out, x_t)
    mu_true, mu_model = r.c1 * x0 + r.c2 * x_t, r.c1 * x0_hat + r.c2 * x_t
    d_mean = r.c1 * e_x0 + TOL32 * (np.abs(r.c1 * x0_hat) + np.abs(r.c2 * x_t)) + 1e-30
    lv2 = np.broadcast_to(r.model_log_var(var_type, extra), x0.shape)
    d_lv = 4 * TOL32 * (1 + np.abs(r.log_beta) + np.abs(r.log_btc))
    kl = ref_kl(mu_true, r.log_btc, mu_model, lv2)
    kl_err = kl_tol(mu_true, r.log_btc, mu_model, lv2, d_mean, d_lv)
    nll = -ref_disc_loglik(x0, mu_model, np.exp(0.5 * lv2))
    nll_err = disc_tol(x0, mu_model, np.exp(0.5 * lv2), d_mean, 0.5 * d_lv)
    first = (r.t == 0).reshape(-1)
    mean = lambda a: a.reshape(len(a), -1).mean(1) / LN2
    vlb = np.where(first, mean(nll), mean(kl))
    err = np.where(first, mean(nll_err), mean(kl_err))
    return vlb, err


# --- normal_kl ------------------------------------------------------------------------------------


def _kl_args(seed, n=64):
    rng = np.random.default_rng(seed)
    m1, m2 = rng.uniform(-3, 3, (2, n)).astype(np.float32)
    lv1, lv2 = rng.uniform(-12, 3, (2, n)).astype(np.float32)
    return [f64(a) for a in (m1, lv1, m2, lv2)]


@SETTINGS
@given(seed=seeds)
def test_normal_kl_is_zero_on_equal_and_matches_closed_form(seed):
    m1, lv1, m2, lv2 = _kl_args(seed)
    j = lambda a: jnp.asarray(a, jnp.float32)
    # KL(p || p) = 0: every term cancels exactly (exp(0) = 1).
    np.testing.assert_array_equal(f64(L.normal_kl(j(m1), j(lv1), j(m1), j(lv1))), 0.0)
    got = L.normal_kl(j(m1), j(lv1), j(m2), j(lv2))
    want = ref_kl(m1, lv1, m2, lv2)
    tol = kl_tol(m1, lv1, m2, lv2)
    assert_within(got, want, tol, "normal_kl")
    assert np.all(f64(got) >= 0)  # Gibbs' inequality, exactly: expm1(d) >= d survives rounding
    # Nearly equal distributions: KL ~ (dm^2 + dlv^2 / 2) / (2 var), still >= 0.
    got = L.normal_kl(j(m1), j(lv1), j(m1 + 1e-3), j(lv1 + 1e-3))
    assert np.all(f64(got) >= 0)


@pytest.mark.parametrize(
    "m1, s1, m2, s2", [(0.0, 1.0, 0.0, 2.0), (0.5, 0.3, -0.2, 0.7), (1.0, 2.0, 0.0, 1.0)]
)
def test_normal_kl_agrees_with_monte_carlo(m1, s1, m2, s2):
    # KL = E_p[log p(x) - log q(x)]: the sample mean of n log-ratios has standard error
    # std / sqrt(n); 6 of them fail a correct KL with probability ~2e-9 (fixed seed anyway).
    n = 200_000
    x = np.random.default_rng(0).normal(m1, s1, n)
    log_ratio = norm.logpdf(x, m1, s1) - norm.logpdf(x, m2, s2)
    se = log_ratio.std() / np.sqrt(n)
    got = float(L.normal_kl(m1, 2 * np.log(s1), m2, 2 * np.log(s2)))
    assert abs(got - log_ratio.mean()) < 6 * se


def test_normal_kl_broadcasts():
    out = L.normal_kl(jnp.ones((3, 2)), jnp.zeros((1, 2)), 0.0, 0.0)
    assert out.shape == (3, 2)
    np.testing.assert_allclose(f64(out), 0.5, rtol=2 * U)  # KL(N(1, 1) || N(0, 1)) = 1/2


# --- discretized_gaussian_log_likelihood ----------------------------------------------------------


def _bins_for(seed, k=16, lo_scale=1e-3, hi_scale=3.0):
    rng = np.random.default_rng(seed)
    means = rng.uniform(-1.5, 1.5, (k, 1)).astype(np.float32)
    log_scales = rng.uniform(np.log(lo_scale), np.log(hi_scale), (k, 1)).astype(np.float32)
    x = np.broadcast_to(GRID.astype(np.float32), (k, 256))
    return x, means, log_scales


@jax.jit  # fixed shapes: one compile per call signature, not per example
def _disc(x, means, log_scales):
    return L.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)


_disc_grad = jax.jit(jax.grad(lambda x, m, ls: jnp.sum(_disc(x, m, ls)), argnums=(1, 2)))


@SETTINGS
@given(seed=seeds)
def test_discretized_bins_sum_to_one(seed):
    x, means, log_scales = _bins_for(seed)
    total = np.exp(f64(_disc(x, means, log_scales))).sum(-1)
    # Each mass p_k is off by at most p_k times the bound on its log (disc_tol), ~1e-6 in all.
    s = np.exp(f64(log_scales))
    tol = (np.exp(ref_disc_loglik(x, means, s)) * disc_tol(x, means, s)).sum(-1)
    assert_within(total, 1.0, tol + 256 * U, "sum of the 256 bins")


@SETTINGS
@given(seed=seeds)
def test_discretized_matches_scipy(seed):
    x, means, log_scales = _bins_for(seed)
    got = _disc(x, means, log_scales)
    s = np.exp(f64(log_scales))
    want = ref_disc_loglik(x, means, s)
    assert_within(got, want, disc_tol(x, means, s), "log-likelihood")


@pytest.mark.parametrize("mean, scale", [(0.3, 0.01), (0.9, 0.005), (-1.4, 0.002), (0.0, 30.0)])
def test_discretized_edge_and_far_bins(mean, scale):
    # Edge bins are the open tails; bins hundreds of standard deviations out keep an exact
    # log-probability (not a clamped one), and the gradients stay finite everywhere.
    ls = np.float32(np.log(scale))
    x = GRID.astype(np.float32)
    got = _disc(x, np.float32(mean), ls)
    s = np.exp(f64(ls))
    assert_within(got, ref_disc_loglik(x, mean, s), disc_tol(x, mean, s), "log-likelihood")
    assert float(got[0]) == pytest.approx(norm.logcdf((-1 + H - mean) / s), rel=1e-5, abs=1e-6)
    assert float(got[-1]) == pytest.approx(norm.logsf((1 - H - mean) / s), rel=1e-5, abs=1e-6)
    if scale < 1:  # (a very wide Gaussian is flat to float32 resolution inside)
        # Strictly monotone away from the mean's bin, down to the farthest edge bin.
        mode = int(np.argmax(f64(got)))
        assert np.all(np.diff(f64(got)[: mode + 1]) > 0) and np.all(np.diff(f64(got)[mode:]) < 0)
    grads = _disc_grad(x, np.float32(mean), ls)
    assert all(np.isfinite(f64(g)) for g in grads)


# --- prior_bpd ------------------------------------------------------------------------------------


@pytest.mark.parametrize("betas", [BETAS, np.array([0.1, 0.2, 0.3])])
def test_prior_bpd_closed_form(betas):
    # KL(N(sqrt(abar) x0, 1 - abar) || N(0, 1)) = (abar (x0^2 - 1) - log(1 - abar)) / 2 per dim.
    s = Schedule.from_betas(betas)
    abar = np.prod(1 - betas)
    x0, x0_64 = grid_x0(3)
    got = L.prior_bpd(s, x0)
    want = (0.5 * (abar * (x0_64**2 - 1) - np.log1p(-abar))).reshape(B, -1).mean(1) / LN2
    # The O(1) terms -1 + 1 - ... cancel in float32 to the O(abar) answer: ~u absolute each.
    lv = np.log1p(-abar)
    tol = 0.5 * TOL32 * (2 + 2 * abs(lv) + abar * (x0_64**2).reshape(B, -1).max(1) + 1) / LN2
    assert_within(got, want, tol, "prior_bpd")
    assert got.shape == (B,)


# --- training_losses ------------------------------------------------------------------------------

_ts = st.lists(st.integers(0, T - 1), min_size=B, max_size=B).map(lambda v: np.array(v, np.int32))


def _constant_model(out):
    return lambda x_t, t: out


@SETTINGS
@given(seed=seeds, t=_ts, mean_type=st.sampled_from(MEAN_TYPES))
def test_simple_loss_perfect_and_zero_models(seed, t, mean_type):
    x0, x0_64 = grid_x0(seed)
    eps, eps_64 = normal(seed + 1)
    tj = jnp.asarray(t)
    r = Ref(BETAS, t)
    v_64 = np.sqrt(r.abar) * eps_64 - np.sqrt(1 - r.abar) * x0_64
    target = {"eps": eps_64, "x0": x0_64, "v": v_64}[mean_type]
    kw = dict(loss_type="simple", mean_type=mean_type, var_type="fixed_small")
    if mean_type != "v":  # the targets eps and x0 are inputs, so a perfect model is exact
        perfect = L.training_losses(
            _constant_model(jnp.asarray(target, jnp.float32)), SCHED, x0, tj, eps, **kw
        )
        assert set(perfect) == {"loss", "mse"}
        np.testing.assert_array_equal(f64(perfect["loss"]), 0.0)
    zero = L.training_losses(_constant_model(jnp.zeros(SHAPE)), SCHED, x0, tj, eps, **kw)
    want = (target**2).reshape(B, -1).mean(1)
    # A mean of 48 squares: summation error <= 48 u relative; v adds a few u per element.
    np.testing.assert_allclose(f64(zero["loss"]), want, rtol=(48 + 8) * U)
    np.testing.assert_array_equal(f64(zero["loss"]), f64(zero["mse"]))


@SETTINGS
@given(seed=seeds, t=st.lists(st.integers(1, T - 1), min_size=B, max_size=B))
def test_kl_of_perfect_eps_model_is_zero(seed, t):
    # With the true eps, x0_hat = x_0 and mu_theta = mu tilde; fixed_small gives the same log
    # variance on both sides, so KL = (mu tilde - mu_theta)^2 / (2 beta tilde) exactly, and only
    # the float32 error d of the two means remains: KL <= d^2 / (2 beta tilde) per element.
    t = np.array(t, np.int32)
    x0, x0_64 = grid_x0(seed)
    eps, eps_64 = normal(seed + 1)
    r = Ref(BETAS, t)
    kw = dict(loss_type="kl", mean_type="eps", var_type="fixed_small")
    got = L.training_losses(_constant_model(eps), SCHED, x0, jnp.asarray(t), eps, **kw)
    assert set(got) == {"loss", "vlb"}
    x_t = np.sqrt(r.abar) * x0_64 + np.sqrt(1 - r.abar) * eps_64
    d = r.c1 * r.x0_hat_error("eps", eps_64, x_t) + 2 * TOL32 * (
        np.abs(r.c1 * x0_64) + np.abs(r.c2 * x_t)
    )
    bound = (d**2 / (2 * np.exp(r.log_btc))).reshape(B, -1).mean(1) / LN2
    assert np.all(f64(got["loss"]) >= 0)
    assert np.all(f64(got["loss"]) <= bound)
    # ...while a slightly wrong eps is seen.
    off = L.training_losses(_constant_model(eps + 0.1), SCHED, x0, jnp.asarray(t), eps, **kw)
    assert np.all(f64(off["loss"]) > 100 * bound)


@SETTINGS
@given(
    seed=seeds,
    data=st.data(),
    short=st.booleans(),
    mean_type=st.sampled_from(MEAN_TYPES),
    var_type=st.sampled_from(VAR_TYPES),
    loss_type=st.sampled_from(("kl", "hybrid")),
)
def test_vlb_and_hybrid_match_float64(seed, data, short, mean_type, var_type, loss_type):
    # A second, short schedule: the hybrid weight 0.001 T must follow T.
    betas, sched = (SHORT_BETAS, SHORT_SCHED) if short else (BETAS, SCHED)
    num_steps = len(betas)
    t = np.array(data.draw(st.lists(st.integers(0, num_steps - 1), min_size=B, max_size=B)))
    x0, x0_64 = grid_x0(seed)
    eps, eps_64 = normal(seed + 1)
    r = Ref(betas, t)
    # A model near the truth, so that t = 0's decoder term is a realistic few bits.
    truth = {
        "eps": eps_64,
        "x0": x0_64,
        "v": np.sqrt(r.abar) * eps_64 - np.sqrt(1 - r.abar) * x0_64,
    }
    noise = f64(normal(seed + 2)[0])
    out = f64(jnp.asarray(truth[mean_type] + 0.05 * noise, jnp.float32))
    extra = f64(jnp.asarray(np.tanh(noise), jnp.float32)) if var_type == "learned_range" else None
    model_out = out if extra is None else np.concatenate([out, extra], -1)
    got = L.training_losses(
        _constant_model(jnp.asarray(model_out, jnp.float32)),
        sched,
        x0,
        jnp.asarray(t, jnp.int32),
        eps,
        loss_type=loss_type,
        mean_type=mean_type,
        var_type=var_type,
    )
    vlb, vlb_err = ref_vlb_bpd(r, mean_type, var_type, x0_64, eps_64, out, extra)
    assert_within(got["vlb"], vlb, vlb_err, "vlb")
    if loss_type == "kl":
        assert set(got) == {"loss", "vlb"}
        assert_within(got["loss"], vlb, vlb_err, "kl loss")
        return
    assert set(got) == {"loss", "mse", "vlb"}
    mse = ((truth[mean_type] - out) ** 2).reshape(B, -1).mean(1)
    mse_err = (48 + 8) * U * mse + TOL32 * 0.05 * np.abs(noise).reshape(B, -1).max(1) * 2
    assert_within(got["mse"], mse, mse_err, "mse")
    # Nichol & Dhariwal 2021 Sec. 3.1: L_hybrid = L_simple + 0.001 T L_vlb (T L_t estimates the
    # sum over t).
    want, tol = mse + 0.001 * num_steps * vlb, mse_err + 0.001 * num_steps * vlb_err + TOL32
    assert_within(got["loss"], want, tol, "hybrid")


def test_vlb_terms_bpd_at_t0_is_the_decoder_nll():
    # t = 0: -log p(x_0 | x_1) of the discretized decoder with mean mu_theta = x0_hat (the
    # posterior mean at the first step is x_0 itself) and variance beta tilde_2 (fixed_small).
    t = np.zeros(B, np.int32)
    x0, x0_64 = grid_x0(5)
    eps, eps_64 = normal(6)
    r = Ref(BETAS, t)
    x_t = np.sqrt(r.abar) * x0_64 + np.sqrt(1 - r.abar) * eps_64
    model_eps = f64(jnp.asarray(eps_64 + 0.5 * f64(normal(7)[0]), jnp.float32))
    got, pred_x0 = L.vlb_terms_bpd(
        SCHED,
        jnp.asarray(model_eps, jnp.float32),
        x0,
        jnp.asarray(x_t, jnp.float32),
        jnp.asarray(t),
        mean_type="eps",
        var_type="fixed_small",
    )
    mean = (x_t - np.sqrt(BETAS[0]) * model_eps) / np.sqrt(1 - BETAS[0])
    btilde_2 = BETAS[1] * BETAS[0] / (1 - (1 - BETAS[0]) * (1 - BETAS[1]))
    scale = np.sqrt(btilde_2)
    d_mean = TOL32 * (np.abs(x_t) + np.sqrt(BETAS[0]) * np.abs(model_eps)) / np.sqrt(1 - BETAS[0])
    nll = -ref_disc_loglik(x0_64, mean, scale).reshape(B, -1).mean(1) / LN2
    tol = disc_tol(x0_64, mean, scale, d_mean, 4 * TOL32 * 10).reshape(B, -1).mean(1) / LN2
    assert_within(got, nll, tol, "decoder NLL")
    assert_within(pred_x0, mean, d_mean, "pred_x0")
    assert np.all(nll > 0.1)  # the test is not vacuous: the decoder is visibly off


@pytest.mark.parametrize("var_type", ["fixed_large", "learned_range"])
def test_hybrid_vlb_does_not_train_the_mean(var_type):
    x0, _ = grid_x0(8)
    eps, _ = normal(9)
    t = jnp.array([0, 3, 500, 999], jnp.int32)
    params = {"w": jnp.float32(0.7), "c": jnp.float32(0.2)}

    def model_fn(p):
        def fn(x_t, t):
            mean = p["w"] * x_t  # the mean-only parameter
            if var_type != "learned_range":
                return mean
            return jnp.concatenate([mean, jnp.full_like(x_t, p["c"])], -1)

        return fn

    @jax.jit  # one compile for all four gradients
    def grads(p):
        def grad(loss_type, key="loss"):
            def f(p):
                terms = L.training_losses(
                    model_fn(p), SCHED, x0, t, eps, loss_type=loss_type, var_type=var_type
                )
                return jnp.mean(terms[key])

            return jax.grad(f)(p)

        return grad("hybrid"), grad("simple"), grad("kl"), grad("hybrid", "vlb")

    hybrid, simple, kl, hybrid_vlb = grads(params)
    # The bound does depend on the mean, so its gradient is stopped, not absent.
    assert abs(float(kl["w"])) > 1e-2
    # Nothing of it reaches w: the same float32 gradient up to summation order.
    np.testing.assert_allclose(float(hybrid["w"]), float(simple["w"]), rtol=1e-6)
    assert float(hybrid_vlb["w"]) == 0.0
    if var_type == "learned_range":
        # ...while the variance is trained by the bound alone, weighted 0.001 T.
        assert float(simple["c"]) == 0.0
        want = 0.001 * T * float(hybrid_vlb["c"])
        assert abs(want) > 1e-3
        np.testing.assert_allclose(float(hybrid["c"]), want, rtol=1e-5)


# --- jit and vmap ---------------------------------------------------------------------------------


def _everything(s, x0, eps, out, out2, t):
    """Every public array function of losses.py at once (one compile under jit / vmap)."""
    model = lambda x_t, t: out + 0.1 * x_t
    model2 = lambda x_t, t: out2 + 0.1 * jnp.concatenate([x_t, x_t], -1)
    kw2 = dict(mean_type="v", var_type="learned_range")
    return {
        "mean_flat": L.mean_flat(x0),
        "normal_kl": L.normal_kl(x0, eps, out, 0.5 * eps),
        "disc": L.discretized_gaussian_log_likelihood(x0, means=out, log_scales=0.3 * eps - 3),
        "prior_bpd": L.prior_bpd(s, x0),
        "vlb_terms_bpd": L.vlb_terms_bpd(s, out2, x0, eps, t, **kw2),
        # "hybrid" holds "simple" and the bound ("kl") as its two terms.
        "hybrid": L.training_losses(model2, s, x0, t, eps, loss_type="hybrid", **kw2),
        "kl": L.training_losses(model, s, x0, t, eps, loss_type="kl", mean_type="x0"),
    }


def test_public_functions_under_jit_and_vmap():
    x0, _ = grid_x0(10)
    eps, _ = normal(11)
    out, _ = normal(12)
    out2 = jnp.concatenate([out, jnp.tanh(eps)], -1)
    args = (SCHED, x0, eps, out, out2, jnp.array([0, 1, 500, 999], jnp.int32))
    # The same float32 program: only fusion and contraction order may differ under jit/vmap.
    # The largest intermediates are ~1/sqrt(abar_T) ~ 160 times the data (x_0 from eps at T).
    close = lambda a, b: np.testing.assert_allclose(f64(a), f64(b), rtol=1e-5, atol=1e-4)
    # jit of vmap over a leading axis of every argument (the schedule included) traces every
    # function abstractly and batches it; each slice must match the eager call.
    stacked = jax.tree.map(lambda a: jnp.stack([a, a[::-1]]), args)
    mapped = jax.jit(jax.vmap(_everything))(*stacked)
    for i in range(2):
        one = _everything(*jax.tree.map(lambda a, i=i: a[i], stacked))
        jax.tree.map(close, jax.tree.map(lambda a, i=i: a[i], mapped), one)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_names_list_the_allowed_ones():
    x0, t = jnp.zeros(SHAPE), jnp.zeros((B,), jnp.int32)
    model = _constant_model(x0)
    cases = [
        (dict(loss_type="l2"), r"unknown loss_type 'l2'; allowed: simple, kl, hybrid"),
        (dict(mean_type="score"), r"unknown mean_type 'score'; allowed: eps, x0, v"),
        (
            dict(var_type="learned"),
            r"unknown var_type 'learned'; allowed: fixed_small, fixed_large, learned_range",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            L.training_losses(model, SCHED, x0, t, x0, **kwargs)


def test_bad_shapes_name_the_shapes():
    x0, t = jnp.zeros(SHAPE), jnp.zeros((B,), jnp.int32)
    with pytest.raises(ValueError, match=r"same shape.*\(4, 4, 4, 3\).*\(4, 4, 4, 1\)"):
        L.training_losses(_constant_model(x0), SCHED, x0, t, jnp.zeros((B, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"t has shape \(3,\).*batch sizes differ"):
        L.training_losses(_constant_model(x0), SCHED, x0, jnp.zeros((3,), jnp.int32), x0)
    # A network with C outputs where learned_range needs 2C (and the other way round).
    with pytest.raises(ValueError, match=r"\(4, 4, 4, 3\).*'learned_range'.*\(4, 4, 4, 6\)"):
        L.training_losses(_constant_model(x0), SCHED, x0, t, x0, var_type="learned_range")
    wide = jnp.zeros((B, 4, 4, 6))
    for loss_type in L.LOSS_TYPES:
        with pytest.raises(ValueError, match=r"\(4, 4, 4, 6\).*'fixed_small'.*\(4, 4, 4, 3\)"):
            L.training_losses(_constant_model(wide), SCHED, x0, t, x0, loss_type=loss_type)
    with pytest.raises(ValueError, match=r"\(4, 4, 4, 6\)"):
        L.vlb_terms_bpd(SCHED, wide, x0, x0, t)
