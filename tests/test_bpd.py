"""The full variational bound (bits/dim) against float64 closed forms.

Analytic "networks" stand in for a trained model, so that every expected value can be derived
by hand: the Bayes-optimal eps-predictor for a single data point, and the eps = 0 predictor,
whose bound terms have a closed-form expectation over the noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from diffjax.core.schedules import Schedule
from diffjax.evaluation import bpd

# A short schedule whose abar_T ~ 0.77 is far from 0, so that the prior term L_T is large
# enough to check (with a standard schedule it is ~1e-5 bits/dim).
BETAS = np.linspace(1e-3, 0.05, 10)
LOG2 = np.log(2.0)


def _x0_batch(batch: int, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(batch, 8, 8, 1))
    pixels[:, 0, 0, 0], pixels[:, 0, 1, 0] = 0, 255  # both edge bins of the decoder occur
    return (pixels / 127.5 - 1.0).astype(np.float32)  # [B, 8, 8, 1] on the 8-bit grid


def _abar() -> np.ndarray:
    return np.cumprod(1.0 - BETAS)  # float64 [T]


def _prior_closed_form(x0: np.ndarray) -> np.ndarray:
    # KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dim, averaged, in bits.
    a = _abar()[-1]
    kl = 0.5 * (-1.0 - np.log(1.0 - a) + (1.0 - a) + a * x0.astype(np.float64) ** 2)
    return kl.reshape(x0.shape[0], -1).mean(axis=1) / LOG2


def _eps_model(schedule: Schedule, x0_star: jax.Array):
    """Bayes-optimal eps when the data is always x0_star: (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""

    def model_fn(x_t, t):
        a = schedule.sqrt_alphas_cumprod[t][:, None, None, None]
        s = schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
        return (x_t - a * x0_star) / s

    return model_fn


def test_perfect_model_bound_is_prior_plus_decoder():
    schedule = Schedule.from_betas(BETAS)
    x0 = np.repeat(_x0_batch(1), 4, axis=0)  # every example is the one data point
    out = jax.jit(
        lambda x, k: bpd.bpd_batch(_eps_model(schedule, x[:1]), schedule, x, k, clip_denoised=False)
    )(jnp.asarray(x0), jax.random.key(0))
    out = jax.device_get(out)

    # The model recovers x0 exactly, so every KL term L_{t-1}, t >= 2, vanishes: only float32
    # round-off of x0 (~1e-6) remains, squared by the KL.
    np.testing.assert_allclose(out["terms_bpd"][:, 1:], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["mse_x0"], 0.0, atol=1e-10)
    np.testing.assert_allclose(out["mse_eps"], 0.0, atol=1e-8)

    # L_0: the decoder's mean is x0 itself (posterior_mean_coef1 = 1 at t = 1) with variance
    # beta tilde_2, so each pixel's bin mass has a closed form (edge bins open to +-inf).
    abar = _abar()
    var = BETAS[1] * (1.0 - abar[0]) / (1.0 - abar[1])
    half_bin = (1.0 / 255.0) / np.sqrt(var)
    x = x0.astype(np.float64)
    edge = np.abs(x) > 0.999
    log_p = np.where(edge, norm.logcdf(half_bin), np.log(norm.cdf(half_bin) - norm.cdf(-half_bin)))
    decoder = -log_p.reshape(4, -1).mean(axis=1) / LOG2
    # float32 CDFs and the clipped log-variance: agreement to ~1e-5 relative.
    np.testing.assert_allclose(out["decoder_bpd"], decoder, rtol=1e-4)
    np.testing.assert_allclose(out["terms_bpd"][:, 0], decoder, rtol=1e-4)

    prior = _prior_closed_form(x0)
    np.testing.assert_allclose(out["prior_bpd"], prior, rtol=1e-5)
    np.testing.assert_allclose(out["total_bpd"], prior + decoder, rtol=1e-4)


def test_zero_eps_model_terms_match_their_expectation():
    # With eps_hat = 0: x0_hat = x_t / sqrt(abar), so x0 - x0_hat = -sqrt((1 - abar) / abar) eps
    # and, with equal (fixed_small) variances, E[L_{t-1}] = coef1^2 (1 - abar) / abar /
    # (2 beta tilde) nats per dim; E[mse_eps] = 1 and E[mse_x0] = (1 - abar) / abar.
    schedule = Schedule.from_betas(BETAS)
    x0 = _x0_batch(64, seed=1)
    out = jax.device_get(
        jax.jit(
            lambda x, k: bpd.bpd_batch(
                lambda x_t, t: jnp.zeros_like(x_t), schedule, x, k, clip_denoised=False
            )
        )(jnp.asarray(x0), jax.random.key(1))
    )
    abar = _abar()
    abar_prev = np.append(1.0, abar[:-1])
    coef1 = BETAS * np.sqrt(abar_prev) / (1.0 - abar)
    post_var = BETAS * (1.0 - abar_prev) / (1.0 - abar)  # 0 at t = 1: skipped below
    kl = coef1[1:] ** 2 * (1.0 - abar[1:]) / abar[1:] / (2.0 * post_var[1:]) / LOG2
    # Each average is over 64 x 64 = 4096 squared normals: relative std sqrt(2 / 4096) = 2.2%;
    # 12% is more than 5 standard deviations.
    np.testing.assert_allclose(out["terms_bpd"].mean(axis=0)[1:], kl, rtol=0.12)
    np.testing.assert_allclose(out["mse_eps"].mean(axis=0), 1.0, rtol=0.12)
    np.testing.assert_allclose(out["mse_x0"].mean(axis=0), (1.0 - abar) / abar, rtol=0.12)
    # The noise is fresh at every step: the per-step eps errors are not all the same draw.
    assert np.unique(np.round(out["mse_eps"][0], 6)).size == len(BETAS)


def test_random_model_bound_is_finite_and_at_least_its_terms():
    schedule = Schedule.from_betas(BETAS)

    def apply_fn(params, x_t, t, y):
        # A learned-range output (2C channels): a mean part and a variance part in [-1, 1].
        return jnp.concatenate([params * x_t, jnp.tanh(x_t)], axis=-1)

    step = bpd.make_bpd_step(apply_fn, schedule, var_type="learned_range", clip_denoised=True)
    out = jax.device_get(step(jnp.float32(0.7), jnp.asarray(_x0_batch(8)), None, jax.random.key(2)))
    for name in bpd.BPD_KEYS:
        assert np.all(np.isfinite(out[name])), name
    # KL terms are non-negative; the decoder NLL of an 8-bit pixel is positive.
    assert np.all(out["terms_bpd"][:, 1:] >= -1e-6)
    assert np.all(out["decoder_bpd"] > 0)
    assert np.all(out["total_bpd"] >= out["decoder_bpd"])
    np.testing.assert_allclose(
        out["total_bpd"], out["prior_bpd"] + out["terms_bpd"].sum(axis=1), rtol=1e-6
    )


def test_dataset_average_uses_masks_labels_and_max_examples():
    schedule = Schedule.from_betas(BETAS)
    seen_labels = []

    def apply_fn(params, x_t, t, y):
        seen_labels.append(y)  # traced once per compile: records that labels reach the model
        return params * x_t + 0.01 * y[:, None, None, None].astype(jnp.float32)

    step = bpd.make_bpd_step(apply_fn, schedule)
    x = _x0_batch(13, seed=3)
    pad = np.full((3, 8, 8, 1), np.nan, np.float32)  # padding must not leak into the average
    batches = [
        {"image": x[:8], "mask": np.ones(8, bool), "label": np.arange(8, dtype=np.int32)},
        {
            "image": np.concatenate([x[8:], pad]),
            "mask": np.arange(8) < 5,
            "label": np.arange(8, dtype=np.int32),
        },
    ]
    key = jax.random.key(3)
    params = jnp.float32(0.5)
    result = bpd.evaluate_bpd(step, params, batches, key, use_labels=True)
    assert result["num_examples"] == 13 and len(seen_labels) == 1

    # Independent average: run each batch, keep the real rows, take the plain mean.
    rows = [
        jax.device_get(step(params, jnp.asarray(b["image"]), jnp.asarray(b["label"]), k))
        for i, b in enumerate(batches)
        for k in [jax.random.fold_in(key, i)]
    ]
    total = np.concatenate([rows[0]["total_bpd"], rows[1]["total_bpd"][:5]])
    terms = np.concatenate([rows[0]["terms_bpd"], rows[1]["terms_bpd"][:5]])
    assert result["total_bpd"] == pytest.approx(total.astype(np.float64).mean(), rel=1e-6)
    np.testing.assert_allclose(result["terms_bpd"], terms.mean(axis=0), rtol=1e-6)
    assert len(result["mse_eps"]) == len(BETAS)

    # Data parallel over the 2 test devices: the same noise (keys do not depend on the
    # layout), so the same numbers up to float32 summation order.
    sharded = bpd.evaluate_bpd(
        step, params, batches, key, use_labels=True, devices=jax.local_devices()[:2]
    )
    assert sharded["num_examples"] == 13
    np.testing.assert_allclose(sharded["terms_bpd"], result["terms_bpd"], rtol=1e-5)

    first10 = bpd.evaluate_bpd(step, params, batches, key, use_labels=True, max_examples=10)
    total10 = np.concatenate([rows[0]["total_bpd"], rows[1]["total_bpd"][:2]])
    assert first10["num_examples"] == 10
    assert first10["total_bpd"] == pytest.approx(total10.astype(np.float64).mean(), rel=1e-6)

    with pytest.raises(ValueError, match="max_examples=0"):
        bpd.evaluate_bpd(step, params, batches, key, max_examples=0)
    with pytest.raises(ValueError, match="no examples"):
        bpd.accumulate_bpd([])
