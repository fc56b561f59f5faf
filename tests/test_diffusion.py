"""Properties of the forward process, its posterior and the reverse parameterizations.

References are float64 numpy computed from the betas alone (never from Schedule fields), mostly
as probability identities: the posterior as a precision-weighted Gaussian product, q(x_t | x_0)
as a composition of one-step kernels, Ho et al. eq. 11 for the eps-parameterized mean.

Tolerances are forward error bounds of the float32 evaluation. With u = 2^-24 (float32 unit
round-off, half an ulp), each term c_i y_i of a float32 sum_i c_i y_i passes through at most ~6
roundings (the stored coefficient, the input, the product, the sum, and a division that XLA may
evaluate as a reciprocal and a product), so the result is within ~6u sum_i |c_i y_i| of the
exact value; ``TOL32 = 8u`` per term bounds that. Inputs are float32 values, and the references
use exactly those values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffjax.core import diffusion as D
from diffjax.core.schedules import get_betas, make_schedule

U = 2.0**-24
TOL32 = 8 * U
T = 1000
B = 6
SHAPE = (B, 4, 4, 3)  # [B, H, W, C]
NAMES = ("linear", "cosine", "quadratic", "sigmoid")
SCHEDULES = {n: make_schedule(n, T) for n in NAMES}
BETAS = {n: get_betas(n, T) for n in NAMES}
SETTINGS = settings(max_examples=25, deadline=None)

ts = st.lists(st.integers(0, T - 1), min_size=B, max_size=B).map(lambda v: np.array(v, np.int32))
names = st.sampled_from(NAMES)
seeds = st.integers(0, 2**32 - 1)


# --- float64 references --------------------------------------------------------------------------


class Ref:
    """Per-example float64 coefficients at t, shaped [B, 1, 1, 1], from the betas alone."""

    def __init__(self, betas: np.ndarray, t: np.ndarray, ndim: int = 4):
        b = np.asarray(betas, np.float64)
        abar = np.cumprod(1.0 - b)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        shape = (len(t),) + (1,) * (ndim - 1)
        self.beta = b[t].reshape(shape)
        self.alpha = 1.0 - self.beta
        self.abar = abar[t].reshape(shape)
        self.abar_prev = abar_prev[t].reshape(shape)
        # beta tilde at the second step, used in place of the first one's 0 where a log is needed.
        self.btilde_2 = b[1] * (1 - abar[0]) / (1 - abar[1])
        self.t = np.asarray(t).reshape(shape)

    def q_sample(self, x0, eps):
        return np.sqrt(self.abar) * x0 + np.sqrt(1 - self.abar) * eps

    def posterior(self, x0, x_t):
        """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), a Gaussian product.

        As a function of x_{t-1}, q(x_t | x_{t-1}) = N(x_t; sqrt(alpha) x_{t-1}, beta) has
        precision alpha / beta about x_t / sqrt(alpha); q(x_{t-1} | x_0) has precision
        1 / (1 - abar_{t-1}) about sqrt(abar_{t-1}) x_0. The product's precision is the sum and
        its mean the precision-weighted mean. At t = 0 the prior is the point mass at x_0.
        Returns (mean, variance, c1, c2) with mean = c1 x_0 + c2 x_t.
        """
        first = self.abar_prev == 1.0
        prior_var = np.where(first, 1.0, 1.0 - self.abar_prev)  # placeholder at t = 0
        prec = self.alpha / self.beta + 1.0 / prior_var
        var = np.where(first, 0.0, 1.0 / prec)
        c1 = np.where(first, 1.0, np.sqrt(self.abar_prev) / prior_var / prec)
        c2 = np.where(first, 0.0, np.sqrt(self.alpha) / self.beta / prec)
        return c1 * x0 + c2 * x_t, var, c1, c2

    def log_var_clipped(self, var):
        return np.log(np.where(self.t == 0, self.btilde_2, var))


def draw(seed: int, shape=SHAPE, scale: float = 1.0):
    """Float32 values, returned as (jnp float32, the same values as float64 numpy)."""
    x = (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)
    return jnp.asarray(x), x.astype(np.float64)


def draw_x0(seed: int, shape=SHAPE):
    x = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
    return jnp.asarray(x), x.astype(np.float64)


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def assert_within(got, want, tol, what=""):
    err = np.abs(f64(got) - want)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), f"{what}: |err| {err[worst]:.3g} > tol {tol[worst]:.3g} at {worst}"


def x0_error_bound(r: Ref, x_t, eps):
    """Bound on predict_x0_from_eps: x_t / sqrt(abar) - sqrt(1/abar - 1) eps.

    It grows like sqrt_recipm1_alphas_cumprod (~1/sqrt(abar)) near t = T, where two terms
    of size |x_t| / sqrt(abar) cancel to an O(1) x_0.
    """
    return TOL32 * (np.abs(x_t) / np.sqrt(r.abar) + np.sqrt((1 - r.abar) / r.abar) * np.abs(eps))


# --- extract ------------------------------------------------------------------------------------


def test_extract_gathers_and_broadcasts():
    coefs = jnp.arange(10.0) * 3
    out = D.extract(coefs, jnp.array([4, 0, 9]), 4)
    assert out.shape == (3, 1, 1, 1)
    np.testing.assert_array_equal(np.asarray(out).ravel(), [12.0, 0.0, 27.0])
    with pytest.raises(ValueError, match=r"shape \[B\].*\(1, 3\)"):
        D.extract(coefs, jnp.array([[4, 0, 9]]), 4)


# --- q(x_t | x_0) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_q_is_the_composition_of_one_step_kernels(name):
    # x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) noise, composed t times from x_0: the mean is
    # prod sqrt(alpha) x_0 and the variance follows v_t = alpha_t v_{t-1} + beta_t, v_0 = 0.
    betas = BETAS[name]
    coef, var = np.empty(T), np.empty(T)
    m, v = 1.0, 0.0
    for i, b in enumerate(betas):
        m, v = m * np.sqrt(1 - b), (1 - b) * v + b
        coef[i], var[i] = m, v
    x0 = jnp.ones((T, 1))
    mean, variance, log_variance = D.q_mean_variance(SCHEDULES[name], x0, jnp.arange(T))
    np.testing.assert_allclose(f64(mean)[:, 0], coef, rtol=2 * U)  # one stored coefficient
    # The square of a stored square root: two roundings doubled, plus the product's.
    np.testing.assert_allclose(f64(variance)[:, 0], var, rtol=3 * U)
    np.testing.assert_allclose(f64(log_variance)[:, 0], np.log(var), atol=2 * U * 10, rtol=0)


@SETTINGS
@given(betas=st.lists(st.floats(1e-4, 0.999), min_size=8, max_size=8), seed=seeds)
def test_q_composition_for_any_betas(betas, seed):
    from diffjax.core.schedules import Schedule

    s = Schedule.from_betas(betas)
    x0, x0_64 = draw(seed, (8, 5))
    t = jnp.arange(8)
    mean, variance, _ = D.q_mean_variance(s, x0, t)
    m, v = np.empty(8), np.empty(8)
    mi, vi = 1.0, 0.0
    for i, b in enumerate(betas):
        mi, vi = mi * np.sqrt(1 - b), (1 - b) * vi + b
        m[i], v[i] = mi, vi
    assert_within(mean, m[:, None] * x0_64, TOL32 * np.abs(m[:, None] * x0_64) + 1e-45, "mean")
    np.testing.assert_allclose(f64(variance), np.broadcast_to(v[:, None], (8, 5)), rtol=3 * U)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_empirical_moments(name):
    # N draws per row at fixed x0 and t: the sample mean is within 6 standard errors
    # sqrt(v/N) of sqrt(abar) x0 and the sample variance within 6 of v sqrt(2/(N-1))
    # (Gaussian); at 6 SE a correct implementation fails with probability ~1e-9 per check.
    n = 20_000
    t = np.array([0, 1, T // 2, T - 1], np.int32)
    x0_rows = np.array([0.7, -0.3, 1.0, -1.0])
    x0 = jnp.asarray(np.broadcast_to(x0_rows[:, None], (4, n)), jnp.float32)
    noise = jax.random.normal(jax.random.key(7), (4, n))
    xt = f64(D.q_sample(SCHEDULES[name], x0, jnp.asarray(t), noise))
    r = Ref(BETAS[name], t, ndim=2)
    want_mean = (np.sqrt(r.abar) * x0_rows[:, None])[:, 0]
    want_var = (1 - r.abar)[:, 0]
    se_mean = np.sqrt(want_var / n)
    se_var = want_var * np.sqrt(2 / (n - 1))
    assert np.all(np.abs(xt.mean(1) - want_mean) < 6 * se_mean)
    assert np.all(np.abs(xt.var(1, ddof=1) - want_var) < 6 * se_var)


@SETTINGS
@given(name=names, t=ts, seed=seeds)
def test_q_sample_is_reparameterized_q(name, t, seed):
    x0, x0_64 = draw_x0(seed)
    eps, eps_64 = draw(seed + 1)
    r = Ref(BETAS[name], t)
    got = D.q_sample(SCHEDULES[name], x0, jnp.asarray(t), eps)
    a, b = np.sqrt(r.abar) * x0_64, np.sqrt(1 - r.abar) * eps_64
    assert_within(got, a + b, TOL32 * (np.abs(a) + np.abs(b)), "q_sample")


# --- the posterior q(x_{t-1} | x_t, x_0) ----------------------------------------------------------


@SETTINGS
@given(name=names, t=ts, seed=seeds)
def test_posterior_is_the_bayes_product(name, t, seed):
    x0, x0_64 = draw_x0(seed)
    x_t, x_t_64 = draw(seed + 1)
    r = Ref(BETAS[name], t)
    mean, var, c1, c2 = r.posterior(x0_64, x_t_64)
    got_mean, got_var, got_logvar = D.q_posterior_mean_variance(
        SCHEDULES[name], x0, x_t, jnp.asarray(t)
    )
    assert got_mean.shape == got_var.shape == got_logvar.shape == SHAPE
    assert_within(got_mean, mean, TOL32 * (np.abs(c1 * x0_64) + np.abs(c2 * x_t_64)), "mean")
    np.testing.assert_allclose(f64(got_var), np.broadcast_to(var, SHAPE), rtol=2 * U)
    # The log is of O(10): its float32 rounding is relative to |log|.
    want_log = np.broadcast_to(r.log_var_clipped(var), SHAPE)
    np.testing.assert_allclose(f64(got_logvar), want_log, rtol=2 * U, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_posterior_variance_properties(name):
    # beta tilde_t <= beta_t and exactly 0 at the first step (the point mass at x_0).
    s = SCHEDULES[name]
    t = jnp.arange(T)
    _, var, logvar = D.q_posterior_mean_variance(s, jnp.zeros((T, 1)), jnp.zeros((T, 1)), t)
    var = f64(var)[:, 0]
    assert var[0] == 0.0
    assert np.all(var <= f64(s.betas))
    assert np.all(var[1:] > 0)
    assert float(logvar[0, 0]) == float(logvar[1, 0])  # the clipped log at t = 0


# --- eps <-> x0 <-> v ---------------------------------------------------------------------------


@SETTINGS
@given(name=names, t=ts, seed=seeds)
def test_eps_x0_v_round_trips(name, t, seed):
    s, r, tj = SCHEDULES[name], Ref(BETAS[name], t), jnp.asarray(t)
    x0, x0_64 = draw_x0(seed)
    eps, eps_64 = draw(seed + 1)
    x_t_64 = r.q_sample(x0_64, eps_64)
    x_t = jnp.asarray(x_t_64, jnp.float32)
    sa, s1a = np.sqrt(r.abar), np.sqrt(1 - r.abar)

    # x_0 from eps: rounding of x_t (and of the terms) is amplified by 1/sqrt(abar).
    got = D.predict_x0_from_eps(s, x_t, tj, eps)
    assert_within(got, x0_64, x0_error_bound(r, x_t_64, eps_64), "x0 from eps")
    # eps from x_0: the same error divided by sqrt(1/abar - 1), large near t = 0.
    got = D.predict_eps_from_x0(s, x_t, tj, x0)
    tol = TOL32 * (np.abs(x_t_64) / sa + np.abs(x0_64)) / (s1a / sa)
    assert_within(got, eps_64, tol, "eps from x0")

    # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022): a rotation of (x_0, eps),
    # so the conversions through v are well conditioned at every t.
    v_64 = sa * eps_64 - s1a * x0_64
    got_v = D.v_from_x0_eps(s, x0, tj, eps)
    assert_within(got_v, v_64, TOL32 * (np.abs(sa * eps_64) + np.abs(s1a * x0_64)), "v")
    v = jnp.asarray(v_64, jnp.float32)
    bound = TOL32 * (np.abs(x_t_64) + np.abs(v_64))
    assert_within(D.predict_x0_from_v(s, x_t, tj, v), x0_64, bound, "x0 from v")
    assert_within(D.predict_eps_from_v(s, x_t, tj, v), eps_64, bound, "eps from v")
    # Two rotations back and forth through diffjax alone: x0 -> v -> x0.
    back = D.predict_x0_from_v(s, x_t, tj, got_v)
    assert_within(back, x0_64, 2 * bound, "x0 -> v -> x0")


# --- the reverse process p(x_{t-1} | x_t) ---------------------------------------------------------


def _perfect_output(mean_type, r, x0_64, eps_64):
    v_64 = np.sqrt(r.abar) * eps_64 - np.sqrt(1 - r.abar) * x0_64
    return {"eps": eps_64, "x0": x0_64, "v": v_64}[mean_type]


@SETTINGS
@given(
    name=names,
    t=ts,
    seed=seeds,
    mean_type=st.sampled_from(D.MEAN_TYPES),
    clip=st.booleans(),
)
def test_perfect_model_gives_the_true_posterior_mean(name, t, seed, mean_type, clip):
    s, r, tj = SCHEDULES[name], Ref(BETAS[name], t), jnp.asarray(t)
    x0, x0_64 = draw_x0(seed)
    eps, eps_64 = draw(seed + 1)
    x_t_64 = r.q_sample(x0_64, eps_64)
    x_t, x_t_64 = jnp.asarray(x_t_64, jnp.float32), f64(jnp.asarray(x_t_64, jnp.float32))
    out_64 = _perfect_output(mean_type, r, x0_64, eps_64)
    out = D.p_mean_variance(
        s,
        jnp.asarray(out_64, jnp.float32),
        x_t,
        tj,
        mean_type=mean_type,
        var_type="fixed_small",
        clip_denoised=clip,
    )
    # Error in the implied x_0 (clipping a value towards an x_0 in [-1, 1] only shrinks it).
    e_x0 = {
        "eps": x0_error_bound(r, x_t_64, eps_64),
        "x0": np.zeros(SHAPE),
        "v": TOL32 * (np.abs(x_t_64) + np.abs(out_64)),
    }[mean_type]
    assert_within(out.pred_x0, x0_64, e_x0, "pred_x0")
    mean, _, c1, c2 = r.posterior(x0_64, x_t_64)
    tol = c1 * e_x0 + TOL32 * (np.abs(c1 * x0_64) + np.abs(c2 * x_t_64)) + TOL32 * c1 * e_x0
    assert_within(out.mean, mean, tol, "mean")


@SETTINGS
@given(name=names, t=ts, seed=seeds)
def test_eps_mean_is_ho_eq_11(name, t, seed):
    # For any eps prediction: mu = (x_t - beta / sqrt(1 - abar) eps) / sqrt(alpha)
    # (Ho et al. 2020 eq. 11), without going through x_0.
    s, r, tj = SCHEDULES[name], Ref(BETAS[name], t), jnp.asarray(t)
    x_t, x_t_64 = draw(seed)
    eps, eps_64 = draw(seed + 1)
    out = D.p_mean_variance(
        s, eps, x_t, tj, mean_type="eps", var_type="fixed_large", clip_denoised=False
    )
    want = (x_t_64 - r.beta / np.sqrt(1 - r.abar) * eps_64) / np.sqrt(r.alpha)
    x0_hat = (x_t_64 - np.sqrt(1 - r.abar) * eps_64) / np.sqrt(r.abar)
    _, _, c1, c2 = r.posterior(x0_hat, x_t_64)
    e_x0 = x0_error_bound(r, x_t_64, eps_64)
    tol = c1 * e_x0 + TOL32 * (np.abs(c1 * x0_hat) + np.abs(c2 * x_t_64)) + 1e-30
    assert_within(out.mean, want, tol, "eq. 11")


@SETTINGS
@given(name=names, t=ts, seed=seeds, mean_type=st.sampled_from(("x0", "v")))
def test_x0_and_v_means_are_the_posterior_at_the_implied_x0(name, t, seed, mean_type):
    s, r, tj = SCHEDULES[name], Ref(BETAS[name], t), jnp.asarray(t)
    x_t, x_t_64 = draw(seed)
    raw, raw_64 = draw(seed + 1, scale=0.5)
    out = D.p_mean_variance(
        s, raw, x_t, tj, mean_type=mean_type, var_type="fixed_small", clip_denoised=False
    )
    if mean_type == "x0":
        x0_hat, e_x0 = raw_64, np.zeros(SHAPE)
    else:
        x0_hat = np.sqrt(r.abar) * x_t_64 - np.sqrt(1 - r.abar) * raw_64
        e_x0 = TOL32 * (np.abs(x_t_64) + np.abs(raw_64))
    mean, _, c1, c2 = r.posterior(x0_hat, x_t_64)
    tol = c1 * e_x0 + TOL32 * (np.abs(c1 * x0_hat) + np.abs(c2 * x_t_64)) + 1e-30
    assert_within(out.mean, mean, tol, mean_type)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_variance_types(name):
    s, r = SCHEDULES[name], Ref(BETAS[name], np.arange(T), ndim=2)
    t, x_t = jnp.arange(T), jnp.zeros((T, 1))
    _, btilde, _, _ = r.posterior(np.zeros((T, 1)), np.zeros((T, 1)))
    first = r.t == 0

    def run(var_type, extra=None):
        out = jnp.zeros((T, 1)) if extra is None else jnp.concatenate([x_t, extra], -1)
        o = D.p_mean_variance(s, out, x_t, t, mean_type="eps", var_type=var_type)
        return f64(o.variance), f64(o.log_variance)

    # fixed_small: beta tilde (Ho et al. Sec. 3.2), its log clipped at the first step.
    var, logvar = run("fixed_small")
    np.testing.assert_allclose(var, btilde, rtol=2 * U)
    btilde_clipped = np.where(first, r.btilde_2, btilde)
    np.testing.assert_allclose(logvar, np.log(btilde_clipped), rtol=2 * U)
    # fixed_large: beta, with beta tilde_2 at the first step (official DDPM code).
    var, logvar = run("fixed_large")
    large = np.where(first, r.btilde_2, r.beta)
    np.testing.assert_allclose(var, large, rtol=2 * U)
    # log of a float32 value: the input's rounding is an absolute u in the log, the log's own
    # rounding relative to |log|.
    log_tol = lambda x: 2 * U * (1 + np.abs(np.log(x)))
    assert_within(logvar, np.log(large), log_tol(large), "fixed_large log")

    # learned_range: exp(f log beta + (1 - f) log beta tilde), f = (out + 1) / 2 (Nichol &
    # Dhariwal 2021 eq. 15): endpoints -1 -> beta tilde (clipped), +1 -> beta, and the
    # geometric interpolation beta^f beta_tilde^(1 - f) between them.
    lb, lbt = np.log(r.beta), np.log(btilde_clipped)
    interp_tol = 4 * TOL32 * (1 + np.abs(lb) + np.abs(lbt))  # a few float32 ops on O(10) logs
    for value, want in ((-1.0, btilde_clipped), (1.0, r.beta)):
        var, logvar = run("learned_range", jnp.full((T, 1), value))
        assert_within(logvar, np.log(want), 2 * log_tol(want), f"learned_range({value}) log")
        np.testing.assert_allclose(var, want, rtol=8 * U * 10)  # exp of a log good to ~|log| u
    extra = np.random.default_rng(0).uniform(-1, 1, (T, 1)).astype(np.float32)
    f = (f64(extra) + 1) / 2
    var, logvar = run("learned_range", jnp.asarray(extra))
    assert_within(logvar, f * lb + (1 - f) * lbt, interp_tol, "log interp")
    geometric = r.beta**f * btilde_clipped ** (1 - f)
    assert_within(var, geometric, geometric * (interp_tol + 2 * U), "geometric interp")
    # The interpolated variance lies between the endpoints.
    assert np.all((var >= btilde_clipped * (1 - 1e-6)) & (var <= r.beta * (1 + 1e-6)))


@SETTINGS
@given(name=names, t=ts, seed=seeds)
def test_clip_denoised_clips_pred_x0(name, t, seed):
    s, r, tj = SCHEDULES[name], Ref(BETAS[name], t), jnp.asarray(t)
    x_t, x_t_64 = draw(seed)
    raw, raw_64 = draw(seed + 1, scale=2.0)  # many values outside [-1, 1]
    kw = dict(mean_type="x0", var_type="fixed_small")
    clipped = D.p_mean_variance(s, raw, x_t, tj, clip_denoised=True, **kw)
    free = D.p_mean_variance(s, raw, x_t, tj, clip_denoised=False, **kw)
    np.testing.assert_array_equal(f64(clipped.pred_x0), np.clip(raw_64, -1, 1))
    np.testing.assert_array_equal(f64(free.pred_x0), raw_64)
    x0_hat = np.clip(raw_64, -1, 1)
    mean, _, c1, c2 = r.posterior(x0_hat, x_t_64)
    assert_within(clipped.mean, mean, TOL32 * (np.abs(c1 * x0_hat) + np.abs(c2 * x_t_64)), "mean")


# --- jit and vmap ---------------------------------------------------------------------------------


def _everything(s, x0, x_t, eps, v, out2, t):
    """Every public array function of diffusion.py at once (one compile under jit / vmap)."""
    res = {
        "q_mean_variance": D.q_mean_variance(s, x0, t),
        "q_sample": D.q_sample(s, x0, t, eps),
        "q_posterior_mean_variance": D.q_posterior_mean_variance(s, x0, x_t, t),
        "predict_x0_from_eps": D.predict_x0_from_eps(s, x_t, t, eps),
        "predict_eps_from_x0": D.predict_eps_from_x0(s, x_t, t, x0),
        "v_from_x0_eps": D.v_from_x0_eps(s, x0, t, eps),
        "predict_x0_from_v": D.predict_x0_from_v(s, x_t, t, v),
        "predict_eps_from_v": D.predict_eps_from_v(s, x_t, t, v),
        "extract": D.extract(s.betas, t, x0.ndim),
    }
    for mt, vt in zip(D.MEAN_TYPES, D.VAR_TYPES, strict=True):
        out = out2 if vt == "learned_range" else eps
        res[f"p_mean_variance[{mt},{vt}]"] = D.p_mean_variance(
            s, out, x_t, t, mean_type=mt, var_type=vt, clip_denoised=True
        )
    return res


def test_public_functions_under_jit_and_vmap():
    s, t = SCHEDULES["linear"], jnp.array([0, 1, 17, 400, 998, 999], jnp.int32)
    x0, _ = draw_x0(1)
    eps, _ = draw(2)
    x_t = D.q_sample(s, x0, t, eps)
    v = D.v_from_x0_eps(s, x0, t, eps)
    args = (s, x0, x_t, eps, v, jnp.concatenate([eps, 0.3 * eps], -1), t)
    # Same float32 program, so only fusion/contraction may differ under jit: a few ulps of the
    # largest intermediate, sqrt(1 / abar) |x_t| (~160 |x_t| at t = T for "linear").
    atol = 8 * U * float(jnp.max(jnp.abs(x_t)) * s.sqrt_recip_alphas_cumprod[-1])

    def close(a, b):
        np.testing.assert_allclose(f64(a), f64(b), rtol=0, atol=atol)

    # jit of vmap over a leading axis of every argument (the schedule included) traces every
    # function abstractly and batches it; each slice must match the eager call.
    stacked = jax.tree.map(lambda a: jnp.stack([a, a[::-1]]), args)
    mapped = jax.jit(jax.vmap(_everything))(*stacked)
    for i in range(2):
        one = _everything(*jax.tree.map(lambda a, i=i: a[i], stacked))
        jax.tree.map(close, jax.tree.map(lambda a, i=i: a[i], mapped), one)


# --- bad input ------------------------------------------------------------------------------------


def test_mismatched_shapes_name_the_shapes():
    s = SCHEDULES["linear"]
    x0, t = jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\).*\(2, 4\)"):
        D.q_sample(s, x0, t, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(2, 3\).*t has shape \(3,\).*batch sizes differ"):
        D.q_sample(s, x0, jnp.zeros((3,), jnp.int32), x0)
    with pytest.raises(ValueError, match=r"t must have shape \[B\], got shape \(2, 1\)"):
        D.q_mean_variance(s, x0, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match="same shape"):
        D.q_posterior_mean_variance(s, x0, jnp.zeros((2, 5)), t)
    for fn in (D.predict_x0_from_eps, D.predict_eps_from_x0, D.predict_x0_from_v):
        with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 1\)"):
            fn(s, x0, t, jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="batch sizes differ"):
        D.p_mean_variance(s, x0, x0, jnp.zeros((5,), jnp.int32))


def test_unknown_names_list_the_allowed_ones():
    s, x, t = SCHEDULES["linear"], jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"unknown mean_type 'foo'; allowed: eps, x0, v"):
        D.p_mean_variance(s, x, x, t, mean_type="foo")
    allowed = "allowed: fixed_small, fixed_large, learned_range"
    with pytest.raises(ValueError, match=f"unknown var_type 'bar'; {allowed}"):
        D.p_mean_variance(s, x, x, t, var_type="bar")
    with pytest.raises(ValueError, match=f"unknown var_type 'bar'; {allowed}"):
        D.model_output_channels(3, "bar")


def test_model_output_channels():
    assert D.model_output_channels(3, "learned_range") == 6
    assert D.model_output_channels(3, "fixed_small") == D.model_output_channels(3, "fixed_large")
    assert D.model_output_channels(1, "fixed_large") == 1
    s, t = SCHEDULES["linear"], jnp.zeros((2,), jnp.int32)
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 3\).*'learned_range'.*\(2, 4, 4, 6\)"):
        D.p_mean_variance(s, x, x, t, var_type="learned_range")
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 6\).*'fixed_small'.*\(2, 4, 4, 3\)"):
        D.p_mean_variance(s, jnp.zeros((2, 4, 4, 6)), x, t, var_type="fixed_small")
