"""Properties of the noise schedules against float64 closed forms.

Every reference is computed here in float64 from the papers' formulas, not from diffjax's own
fields. Float32 tolerances: a float64 value rounded once to float32 is within half an ulp,
2^-24 relative (for normal numbers); the float64 references agree with diffjax's float64
intermediates to ~1e-12 relative (the worst cancellation is 1 - abar_t with abar_t = 1 - beta_1,
~1e-16 / beta_1), so two half-ulps (2^-23) bound every stored field.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _respace_reference import respace_f64
from hypothesis import given, settings
from hypothesis import strategies as st

from diffjax.core.respacing import respace_schedule
from diffjax.core.schedules import SCHEDULES, Schedule, get_betas, make_schedule

NAMES = ("linear", "cosine", "quadratic", "sigmoid")
FIELDS = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
F32_RTOL = 2.0**-23  # two half-ulps: one rounding to float32 plus float64 noise (module doc)
SETTINGS = settings(max_examples=40, deadline=None)


# --- closed forms, float64 ---------------------------------------------------------------------


def _frac(i: int, T: int) -> float:
    """Position of step i on [0, 1]; a single step sits at the start (np.linspace semantics)."""
    return i / (T - 1) if T > 1 else 0.0


def closed_form_betas(name: str, T: int) -> np.ndarray:
    """Each schedule written out per step with math.* (no vectorized numpy)."""
    scale = 1000.0 / T  # Nichol & Dhariwal 2021: the T=1000 range rescaled to other T
    lo, hi = 1e-4 * scale, 0.02 * scale
    out = []
    for i in range(T):
        u = _frac(i, T)
        if name == "linear":
            b = lo + (hi - lo) * u
        elif name == "quadratic":
            b = (math.sqrt(lo) + (math.sqrt(hi) - math.sqrt(lo)) * u) ** 2
        elif name == "sigmoid":
            b = lo + (hi - lo) / (1.0 + math.exp(-(-6.0 + 12.0 * u)))
        else:  # cosine, Nichol & Dhariwal 2021 eq. 17
            b = 1.0 - cosine_alphabar(i + 1, T) / cosine_alphabar(i, T)
        out.append(min(b, 0.999))
    return np.array(out)


def cosine_alphabar(t: int, T: int, s: float = 0.008) -> float:
    """Nichol & Dhariwal 2021 eq. 17: alphabar(t) = f(t)/f(0), f(t) = cos^2((t/T+s)/(1+s) pi/2)."""

    def f(u: float) -> float:
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    return f(t) / f(0)


def reference_fields(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every Schedule field from its definition (Ho et al. 2020 eq. 4, 6-7), float64."""
    b = np.asarray(betas, np.float64)
    a = 1.0 - b
    abar = np.cumprod(a)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    btilde = (1.0 - abar_prev) / (1.0 - abar) * b
    log_clipped = np.log(np.concatenate([[btilde[1] if b.size > 1 else b[0]], btilde[1:]]))
    return dict(
        betas=b,
        alphas=a,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        log_one_minus_alphas_cumprod=np.log(1.0 - abar),
        sqrt_recip_alphas_cumprod=1.0 / np.sqrt(abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt((1.0 - abar) / abar),
        posterior_variance=btilde,
        posterior_log_variance_clipped=log_clipped,
        posterior_mean_coef1=np.sqrt(abar_prev) * b / (1.0 - abar),
        posterior_mean_coef2=np.sqrt(a) * (1.0 - abar_prev) / (1.0 - abar),
    )


def assert_fields_match(s: Schedule, betas: np.ndarray) -> None:
    T = len(betas)
    assert s.num_timesteps == T
    ref = reference_fields(betas)
    for name in FIELDS:
        got = getattr(s, name)
        assert got.dtype == jnp.float32, name
        assert got.shape == (T,), name
        want = ref[name]
        # The logs are O(10): a half-ulp of the float32 log is relative to |log|, and 0 (log 1)
        # needs an absolute floor of the same size.
        atol = F32_RTOL if name.startswith("log") or "log_" in name else 1e-44
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=F32_RTOL, atol=atol)


# --- get_betas -----------------------------------------------------------------------------------


def test_linear_at_1000_is_ho_et_al():
    b = get_betas("linear", 1000)
    assert b[0] == pytest.approx(1e-4, rel=1e-15) and b[-1] == pytest.approx(0.02, rel=1e-15)
    # Equally spaced: constant increments of (0.02 - 1e-4) / 999.
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_quadratic_at_1000_is_linear_in_sqrt_beta():
    b = get_betas("quadratic", 1000)
    assert b[0] == pytest.approx(1e-4, rel=1e-14) and b[-1] == pytest.approx(0.02, rel=1e-14)
    np.testing.assert_allclose(np.diff(np.sqrt(b)), (math.sqrt(0.02) - 0.01) / 999, rtol=1e-9)
    assert np.all(np.diff(b, 2) > 0)  # convex in t


def test_sigmoid_at_1000_is_symmetric_ramp():
    b = get_betas("sigmoid", 1000)
    lo, hi = 1e-4, 0.02
    # sigmoid(x) + sigmoid(-x) = 1 on the symmetric ramp [-6, 6]: b_i + b_{T-1-i} = lo + hi.
    np.testing.assert_allclose(b + b[::-1], lo + hi, rtol=1e-14)
    assert b[0] == pytest.approx(lo + (hi - lo) / (1 + math.exp(6)), rel=1e-14)
    assert np.all(np.diff(b) > 0)


def test_cosine_at_1000_reproduces_alphabar_until_the_cap():
    T = 1000
    b = get_betas("cosine", T)
    assert b[-1] == 0.999  # alphabar(T) = 0 would make beta_T = 1; the cap keeps it a variance
    assert np.all(b <= 0.999)
    abar = np.cumprod(1.0 - b)
    want = np.array([cosine_alphabar(t, T) for t in range(1, T + 1)])
    capped = int(np.argmax(b >= 0.999))
    # Products of 1 - beta reproduce f(t)/f(0) up to float64 round-off accumulated over t steps.
    np.testing.assert_allclose(abar[:capped], want[:capped], rtol=1e-11)
    # s = 0.008 keeps beta_1 small but positive: 1 - f(1/T)/f(0), a few 1e-5 at T=1000.
    assert 1e-5 < b[0] < 1e-4


@SETTINGS
@given(name=st.sampled_from(NAMES), T=st.integers(1, 3000))
def test_every_schedule_matches_its_closed_form(name, T):
    b = get_betas(name, T)
    assert b.dtype == np.float64 and b.shape == (T,)
    assert np.all(b > 0) and np.all(b <= 1)
    # 1 - r with r = alphabar ratio near 1 loses ~1e-16/beta relative digits (beta >= ~1e-5).
    np.testing.assert_allclose(b, closed_form_betas(name, T), rtol=1e-10)


@SETTINGS
@given(T=st.integers(21, 3000))
def test_range_scales_with_1000_over_T(T):
    # Nichol & Dhariwal 2021: endpoints scale by 1000/T (no cap needed from T = 21 on).
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    lin, quad, sig = (get_betas(n, T) for n in ("linear", "quadratic", "sigmoid"))
    assert (lin[0], lin[-1]) == (pytest.approx(lo, rel=1e-14), pytest.approx(hi, rel=1e-14))
    assert (quad[0], quad[-1]) == (pytest.approx(lo, rel=1e-14), pytest.approx(hi, rel=1e-14))
    sig_lo = lo + (hi - lo) / (1 + math.exp(6))
    assert sig[0] == pytest.approx(sig_lo, rel=1e-14)
    assert sig[-1] == pytest.approx(lo + hi - sig_lo, rel=1e-14)
    # So the total noise sum_t beta_t of "linear" is T-independent: T (lo + hi) / 2.
    assert lin.sum() == pytest.approx(1000 * (1e-4 + 0.02) / 2, rel=1e-12)


@SETTINGS
@given(name=st.sampled_from(NAMES), T=st.integers(1, 3000))
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(name, T):
    abar = np.cumprod(1.0 - get_betas(name, T))
    assert np.all((abar > 0) & (abar < 1))
    assert np.all(np.diff(abar) < 0)
    s = make_schedule(name, T)
    abar32 = np.asarray(s.alphas_cumprod)
    # betas >= ~1e-5 >> the float32 ulp near 1, so rounding cannot tie neighbours.
    assert np.all((abar32 > 0) & (abar32 < 1))
    assert np.all(np.diff(abar32) < 0)


# --- Schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 2, 7, 1000])
def test_named_schedule_fields_match_float64(name, T):
    s = make_schedule(name, T)
    assert_fields_match(s, closed_form_betas(name, T))


@SETTINGS
@given(betas=st.lists(st.floats(1e-5, 0.999), min_size=1, max_size=12))
def test_schedule_fields_match_float64_for_any_betas(betas):
    s = Schedule.from_betas(betas)
    assert_fields_match(s, np.array(betas))
    post = np.asarray(s.posterior_variance)
    # beta tilde = (1 - abar_{t-1}) / (1 - abar_t) beta <= beta (monotone rounding keeps it).
    assert np.all(post <= np.asarray(s.betas))
    assert post[0] == 0.0  # q(x_0 | x_1, x_0) is a point mass


def test_log_variance_clipped_uses_second_posterior_variance():
    betas = get_betas("linear", 1000)
    s = Schedule.from_betas(betas)
    abar = np.cumprod(1 - betas)
    btilde_2 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    assert float(s.posterior_log_variance_clipped[0]) == pytest.approx(np.log(btilde_2), rel=1e-7)
    assert float(s.posterior_log_variance_clipped[0]) == float(s.posterior_log_variance_clipped[1])
    # T = 1 has no second step: beta_1 itself.
    one = Schedule.from_betas([0.3])
    assert float(one.posterior_log_variance_clipped[0]) == pytest.approx(np.log(0.3), rel=1e-7)


def test_extreme_betas_stay_exact():
    # beta below float64 resolution of 1: 1 - abar must still be beta, not 0 (0/0 in beta tilde).
    s = Schedule.from_betas([1e-20, 0.5, 0.5])
    fields = {k: np.asarray(getattr(s, k), np.float64) for k in FIELDS}
    assert all(np.all(~np.isnan(v)) for v in fields.values())
    assert fields["sqrt_one_minus_alphas_cumprod"][0] == pytest.approx(1e-10, rel=1e-6)
    assert fields["sqrt_recipm1_alphas_cumprod"][0] == pytest.approx(1e-10, rel=1e-6)
    # beta tilde_2 = (1 - abar_1)/(1 - abar_2) beta_2 = 1e-20 / 0.5 * 0.5
    assert fields["posterior_variance"][1] == pytest.approx(1e-20, rel=1e-6)
    assert fields["posterior_mean_coef1"][0] == pytest.approx(1.0, rel=1e-6)
    # beta = 1 destroys the signal: abar = 0 from there on, the inverse coefficients are +inf.
    s = Schedule.from_betas([0.5, 1.0, 0.5])
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), [0.5, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(s.posterior_variance), [0.0, 0.5, 0.5])
    assert np.isposinf(np.asarray(s.sqrt_recip_alphas_cumprod)[1:]).all()


def test_schedule_is_a_pytree_usable_under_jit_and_vmap():
    s = make_schedule("linear", 50)
    assert len(jax.tree.leaves(s)) == len(FIELDS)
    last = jax.jit(lambda s: s.alphas_cumprod[s.num_timesteps - 1])(s)
    assert float(last) == pytest.approx(np.prod(1 - get_betas("linear", 50)), rel=F32_RTOL)
    # A stack of schedules with the same T maps like any pytree; T stays static inside.
    stack = jax.tree.map(lambda *xs: jnp.stack(xs), s, make_schedule("cosine", 50))
    lasts = jax.vmap(lambda s: s.alphas_cumprod[s.num_timesteps - 1])(stack)
    want = [np.prod(1 - get_betas(n, 50)) for n in ("linear", "cosine")]
    np.testing.assert_allclose(np.asarray(lasts), want, rtol=F32_RTOL)


# --- respacing (diffjax.core.respacing) against its float64 definition ---------------------------


@SETTINGS
@given(
    name=st.sampled_from(NAMES),
    data=st.data(),
)
def test_respaced_schedule_keeps_alphas_cumprod(name, data):
    T = 200
    kept = data.draw(st.sets(st.integers(0, T - 1), min_size=1, max_size=T))
    steps = np.array(sorted(kept))
    spaced, tmap = respace_schedule(make_schedule(name, T), steps)
    np.testing.assert_array_equal(tmap, steps)
    assert tmap.dtype == np.int32 and spaced.num_timesteps == len(kept)
    betas = np.asarray(spaced.betas, np.float64)
    assert np.all((betas > 0) & (betas <= 1))
    # abar' at the kept steps is the original float64 abar, to float32 rounding.
    want = np.cumprod(1 - get_betas(name, T))[steps]
    np.testing.assert_allclose(np.asarray(spaced.alphas_cumprod), want, rtol=4 * F32_RTOL)
    # The new alphas = exp(float32 sum of up to T log1p(-beta) terms): relative error ~ the
    # sum's absolute error, a few ulps of each term; 1e-5 (1 + |log alpha'|) bounds it.
    want_betas = respace_f64(get_betas(name, T), steps)[0]
    want_alphas = 1 - want_betas
    bound = 1e-5 * (1 + np.abs(np.log(want_alphas)))
    assert np.all(np.abs(np.asarray(spaced.alphas) - want_alphas) <= bound * want_alphas)
    assert np.all(np.abs(betas - want_betas) <= bound * want_alphas + 2e-7 * want_betas)


@pytest.mark.parametrize("name", NAMES)
def test_respacing_every_step_reproduces_the_schedule(name):
    s = make_schedule(name, 1000)
    spaced, tmap = respace_schedule(s, np.arange(1000))
    np.testing.assert_array_equal(tmap, np.arange(1000))
    # One step per segment: beta -> log1p(-beta) -> -expm1 again in float32, a few ulps.
    np.testing.assert_allclose(spaced.betas, s.betas, rtol=8 * F32_RTOL)
    np.testing.assert_array_equal(spaced.alphas_cumprod, s.alphas_cumprod)


def test_respacing_every_tenth_step():
    betas = get_betas("linear", 1000)
    spaced, _ = respace_schedule(make_schedule("linear", 1000), np.arange(9, 1000, 10))
    abar = np.cumprod(1 - betas)
    assert spaced.num_timesteps == 100
    # First new step covers original steps 0..9: 1 - prod(1 - beta_0..9).
    assert float(spaced.betas[0]) == pytest.approx(1 - abar[9], rel=1e-5)
    assert float(spaced.betas[5]) == pytest.approx(1 - abar[59] / abar[49], rel=1e-5)


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_schedule_names_value_and_allowed():
    with pytest.raises(ValueError, match="unknown schedule 'foo'") as e:
        get_betas("foo", 10)
    assert all(n in str(e.value) for n in SCHEDULES)
    with pytest.raises(ValueError, match="'foo'"):
        make_schedule("foo", 10)


@pytest.mark.parametrize("T", [0, -3, 2.5, 10.0, "10", True, None])
def test_bad_num_timesteps(T):
    with pytest.raises(ValueError, match=r"num_timesteps must be (an int )?>= 1") as e:
        get_betas("linear", T)
    assert repr(T) in str(e.value)


@pytest.mark.parametrize(
    "betas, bad",
    [
        ([0.1, 0.0, 0.2], "0.0"),
        ([0.1, -0.2], "-0.2"),
        ([0.1, 1.5], "1.5"),
        ([0.1, float("nan")], "nan"),
        ([float("inf")], "inf"),
    ],
)
def test_bad_betas_value(betas, bad):
    for fn in (Schedule.from_betas,):
        with pytest.raises(ValueError, match=r"in \(0, 1\]") as e:
            fn(betas)
        assert bad in str(e.value)


@pytest.mark.parametrize("betas", [[], [[0.1, 0.2]], 0.1])
def test_bad_betas_shape(betas):
    with pytest.raises(ValueError, match="1-D array") as e:
        Schedule.from_betas(betas)
    assert "shape" in str(e.value)
