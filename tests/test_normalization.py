"""Group normalisation against a float64 numpy reference: values and every gradient.

The reference is Wu & He 2018 eq. 1-3 written directly (two-pass mean and variance in float64);
gradients are checked against central differences of it, so the hand-written backward pass is
compared with the definition, not with itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffjax.kernels.normalization import group_norm
from diffjax.models.layers import GroupNorm

EPS = 1e-6


def reference(x, scale, bias, groups, swish=False):
    """float64 group norm of x [B, H, W, C], then swish(y) = y / (1 + exp(-y)) if asked."""
    b, h, w, c = x.shape
    xg = x.reshape(b, h * w, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = xg.var(axis=(1, 3), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + EPS)).reshape(x.shape) * scale + bias
    return y / (1.0 + np.exp(-y)) if swish else y


def central_difference_grads(x, scale, bias, groups, dy, swish=False, h=1e-6):
    """Gradient of sum(reference * dy) w.r.t. each argument, one coordinate at a time."""
    args = [x.copy(), scale.copy(), bias.copy()]
    grads = []
    for i, a in enumerate(args):
        g = np.zeros_like(a)
        for j in np.ndindex(a.shape):
            step = h * max(1.0, abs(a[j]))
            a[j] += step
            up = np.sum(reference(*args, groups, swish) * dy)
            a[j] -= 2 * step
            down = np.sum(reference(*args, groups, swish) * dy)
            a[j] += step
            g[j] = (up - down) / (2 * step)
        grads.append(g)
        args[i] = a
    return grads


@st.composite
def cases(draw):
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 3))
    w = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    per_group = draw(st.sampled_from([1, 2, 4]))
    if h * w * per_group < 4:  # a group of 1-3 values has a near-degenerate variance
        h, w = 2, 2
    loc = draw(st.sampled_from([0.0, 30.0]))
    seed = draw(st.integers(0, 2**16))
    swish = draw(st.booleans())
    return b, h, w, groups, per_group, loc, seed, swish


@settings(max_examples=12, deadline=None)
@given(cases())
def test_group_norm_value_and_gradients_match_float64(case):
    b, h, w, groups, per_group, loc, seed, swish = case
    c = groups * per_group
    rng = np.random.default_rng(seed)
    # Channel means spread inside a group plus a common offset `loc`: with loc=30 the naive
    # E[x^2] - E[x]^2 loses ~900 * 6e-8 of a unit variance, the shifted moments do not.
    x = loc + rng.normal(0, 1, (b, h, w, c)) + rng.normal(0, 0.5, c)
    scale = rng.uniform(0.5, 1.5, c)
    bias = rng.normal(0, 1, c)
    dy = rng.normal(0, 1, (b, h, w, c))

    def f(xx, ss, bb):
        return group_norm(xx, ss, bb, groups, EPS, jnp.float32, swish)

    @jax.jit  # one program per example, not one per operation
    def value_and_grads(xx, ss, bb, g):
        y, vjp = jax.vjp(f, xx, ss, bb)
        return y, vjp(g)

    args32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    y, got_grads = value_and_grads(*args32, jnp.asarray(dy, jnp.float32))
    # Inputs are rounded to float32 first; compare against the reference at those inputs.
    x32, s32, b32 = (np.asarray(a, np.float64) for a in args32)
    # Values: normalised entries are O(1) (|x - mean| / std <= sqrt(n) ~ 6); float32 rounding of
    # the centred x (ulp(loc) / std ~ 2e-6 at loc=30) and of the statistics stays below 1e-5;
    # swish's slope is at most 1.1, so the same bound holds after it.
    want_y = reference(x32, s32, b32, groups, swish)
    np.testing.assert_allclose(np.asarray(y), want_y, atol=1e-5)
    want = central_difference_grads(x32, s32, b32, groups, dy, swish)
    for name, g, r in zip(("x", "scale", "bias"), got_grads, want, strict=True):
        # Central differences with h ~ 1e-6 are exact to ~1e-9 here; the float32 gradient sums
        # n <= 36 terms of size |dy| * |xhat| <= 6, so its error is well below 1e-4 of the
        # largest entry (swish' is in [-0.1, 1.1]). A wrong sign or a missing term (mean_G(g),
        # xhat mean_G(g xhat), or swish's y s (1 - s)) moves entries by O(1).
        tol = 1e-4 * max(1.0, np.max(np.abs(r)))
        np.testing.assert_allclose(np.asarray(g), r, atol=tol, rtol=0, err_msg=name)


def test_group_norm_swish_bfloat16_rounds_once():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(3.0, 2.0, (2, 4, 4, 8)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
    bias = jnp.asarray(rng.normal(0, 1, 8), jnp.float32)
    y, vjp = jax.vjp(
        lambda a, s, b: group_norm(a, s, b, 4, EPS, jnp.bfloat16, True), x, scale, bias
    )
    dx = vjp(jnp.ones_like(y))[0]
    assert (y.dtype, dx.dtype) == (jnp.bfloat16, jnp.bfloat16)
    ref = reference(np.asarray(x, np.float64), np.asarray(scale), np.asarray(bias), 4, True)
    # float32 throughout, one bfloat16 rounding of swish(y): within half an ulp of bfloat16 at
    # each value (plus the float32 statistics' ~1e-6). Rounding y to bfloat16 before swish as
    # well adds up to swish'(y) times another half ulp, which this bound does not allow.
    half_ulp = 2.0 ** (np.floor(np.log2(np.abs(ref))) - 8)
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= half_ulp * 1.001 + 1e-6), np.max(err / half_ulp)


def test_group_norm_bfloat16_compute_dtypes_and_values():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(3.0, 2.0, (2, 4, 4, 8)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
    bias = jnp.asarray(rng.normal(0, 1, 8), jnp.float32)
    y, vjp = jax.vjp(lambda a, s, b: group_norm(a, s, b, 4, EPS, jnp.bfloat16), x, scale, bias)
    dx, ds, db = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, ds.dtype, db.dtype) == (jnp.bfloat16,) * 2 + (jnp.float32,) * 2
    ref = reference(np.asarray(x, np.float64), np.asarray(scale), np.asarray(bias), 4)
    # float32 statistics, one bfloat16 rounding of the output: 2^-8 relative, |y| <= ~4.
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=4 * 2**-8)
    # d(sum y)/dbias = pixels per sample x samples; d(sum y)/dscale = sum xhat = 0 per channel
    # summed over a group, so only its group sums vanish.
    np.testing.assert_allclose(np.asarray(db), np.full(8, 2 * 16.0))
    np.testing.assert_allclose(np.asarray(ds).reshape(4, 2).sum(-1), 0.0, atol=1e-3)


@pytest.mark.parametrize(("loc", "channels"), [(3.0, 64), (1000.0, 32)])
def test_group_norm_module_matches_float64_reference(loc, channels):
    rng = np.random.default_rng(0)
    # loc=1000 would lose all precision to cancellation in a naive E[x^2] - E[x]^2
    # (1e6 * 6e-8 ~ var).
    x = loc + rng.normal(0.0, 2.0, (2, 4, 4, channels)) + rng.normal(0, 0.5, channels)
    scale = np.linspace(0.5, 1.5, channels)
    bias = np.linspace(-1.0, 1.0, channels)
    params = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias)}}
    x32 = jnp.asarray(x, jnp.float32)
    got = np.asarray(GroupNorm(32).apply(params, x32))
    ref = reference(np.asarray(x32, np.float64), scale, bias, 32)
    # (x - s) a + offset with s a value of the channel: the centred values are exact, so the
    # error is float32 rounding of O(1) results plus the statistics' (~1e-6 relative), whatever
    # loc is. A cancelling variance would be off by ~1.5% of every value at loc=1000.
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
