"""DPM-Solver++: step for step equal to diffusers, order 1 = DDIM, and its order of convergence.

The model is the exact denoiser of Gaussian data N(MU, SD^2): E[x_0 | x_t] = MU +
a SD^2 / (a^2 SD^2 + s^2) (x_t - a MU) with a = sqrt(abar_t), s = sqrt(1 - abar_t), whose
probability flow ODE has a closed-form solution: the map of quantiles
x_t = a_t MU + sqrt(a_t^2 SD^2 + s_t^2) z.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import choices
from diffjax.core import dpm_solver, sampling
from diffjax.core.schedules import make_schedule

MU, SD = 0.3, 0.5
SCHEDULE = make_schedule("linear", 1000)
ABAR = np.asarray(SCHEDULE.alphas_cumprod)  # float32, as both samplers see it


def _x0(x, a, s):
    return MU + a * SD**2 / (a**2 * SD**2 + s**2) * (x - a * MU)


# What the network predicts, from (x_t, x0_hat, a, s), per mean_type.
_OUTPUT = {
    "eps": lambda x, x0, a, s: (x - a * x0) / s,
    "x0": lambda x, x0, a, s: x0,
    "v": lambda x, x0, a, s: a * (x - a * x0) / s - s * x0,  # v = a eps - s x0
}


def jax_model(mean_type):
    def model_fn(x, t):
        a = jnp.sqrt(SCHEDULE.alphas_cumprod[t])[:, None, None, None]
        s = jnp.sqrt(1.0 - SCHEDULE.alphas_cumprod[t])[:, None, None, None]
        return _OUTPUT[mean_type](x, _x0(x, a, s), a, s)

    return model_fn


def _x_T(batch=8):
    return jax.random.normal(jax.random.key(0), (batch, 2, 2, 1))  # [B, H, W, C]


def _dpm(x_T, **kw):
    kw.setdefault("clip_denoised", False)
    model = jax_model(kw.get("mean_type", "eps"))
    return sampling.dpm_solver_sample(model, SCHEDULE, jax.random.key(1), x_T.shape, x_T=x_T, **kw)


# --- the peer: diffusers' DPMSolverMultistepScheduler --------------------------------------------

_DIFFUSERS_SPACING = {"time": {}, "karras": {"use_karras_sigmas": True},
                      "logsnr": {"use_lu_lambdas": True}}  # fmt: skip
_DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_sample(x_T, *, num_steps, order, spacing, mean_type="eps", noises=None):
    """diffusers' samples from x_T; ``noises`` [K, ...]: SDE-DPM-Solver++ with that noise at
    step i (its ``variance_noise``), else DPM-Solver++."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=np.asarray(SCHEDULE.betas, np.float64),
        solver_order=order,
        prediction_type=_DIFFUSERS_PREDICTION[mean_type],
        algorithm_type="dpmsolver++" if noises is None else "sde-dpmsolver++",
        **_DIFFUSERS_SPACING[spacing],
    )
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(np.asarray(x_T, np.float64))
    for i, t in enumerate(scheduler.timesteps):
        a = float(np.sqrt(np.float64(ABAR[int(t)])))
        s = float(np.sqrt(1.0 - np.float64(ABAR[int(t)])))
        out = _OUTPUT[mean_type](x, _x0(x, a, s), a, s)
        z = None if noises is None else torch.from_numpy(np.asarray(noises[i], np.float64))
        x = scheduler.step(out, t, x, variance_noise=z).prev_sample
    return x.numpy(), scheduler.timesteps.numpy()


@pytest.mark.parametrize("spacing", ["time", "karras", "logsnr"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("num_steps", [10, 20])  # 10: lower orders at the last two steps
def test_equal_to_diffusers_step_for_step(spacing, order, num_steps):
    x_T = _x_T()
    want, want_t = diffusers_sample(x_T, num_steps=num_steps, order=order, spacing=spacing)
    _, t = dpm_solver.noise_levels(SCHEDULE, num_steps, spacing)
    np.testing.assert_array_equal(np.asarray(t), want_t)  # the network sees the same steps
    got = _dpm(x_T, num_steps=num_steps, order=order, spacing=spacing)
    # diffusers computes its noise levels from the same float32 abar in float64 and stores them
    # in float32, and casts the sample to float32 for every update, so both sides run float32
    # arithmetic on equal inputs: differences are a few ulps per step, accumulated over <= 20
    # steps of coefficients <= ~10 (measured <= 2e-5 on samples of scale 1). A wrong weight,
    # step or order changes the result by >= 1e-3.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("num_steps", [10, 20])
def test_sde_variant_equal_to_diffusers_sde_dpmsolver_pp_with_the_same_noise(order, num_steps):
    # The noise of step i is fold_in(step_key, i) (init_key, step_key = split(rng)); diffusers
    # takes it as variance_noise. Same float32 arithmetic, same tolerance as the ODE solver.
    x_T = _x_T()
    step_key = jax.random.split(jax.random.key(1))[1]
    noises = [
        jax.random.normal(jax.random.fold_in(step_key, i), x_T.shape) for i in range(num_steps)
    ]
    want, _ = diffusers_sample(
        x_T, num_steps=num_steps, order=order, spacing="logsnr", noises=noises
    )
    got = _dpm(x_T, num_steps=num_steps, order=order, spacing="logsnr", sde=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # It is not the ODE solver: the noise moves the samples by O(1).
    assert np.max(np.abs(got - _dpm(x_T, num_steps=num_steps, order=order))) > 1e-2


@pytest.mark.parametrize("mean_type", ["x0", "v"])
def test_equal_to_diffusers_for_x0_and_v_models(mean_type):
    x_T = _x_T()
    want, _ = diffusers_sample(x_T, num_steps=10, order=2, spacing="logsnr", mean_type=mean_type)
    got = _dpm(x_T, num_steps=10, order=2, spacing="logsnr", mean_type=mean_type)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # as above


@pytest.mark.parametrize("num_steps", [1, 5, 50])
def test_order_1_is_ddim_with_eta_0_on_the_same_steps(num_steps):
    # First-order DPM-Solver++ from s to t: (s_t/s_s) x + (a_t - s_t a_s / s_s) x0_hat, which is
    # DDIM's a_t x0_hat + s_t (x - a_s x0_hat)/s_s; "uniform" levels are DDIM's steps, ending at
    # abar = 1. The two compute x0_hat = (x - s eps)/a in different float32 forms, and at
    # t = T - 1 (a = 0.0064) dividing by a amplifies their rounding 160-fold: measured 4e-5.
    # A wrong step or coefficient differs by > 1e-2.
    x_T = _x_T(32)
    ddim = sampling.ddim_sample(
        jax_model("eps"), SCHEDULE, jax.random.key(1), x_T.shape, num_steps=num_steps, eta=0.0,
        clip_denoised=True, x_T=x_T,
    )  # fmt: skip
    got = _dpm(x_T, num_steps=num_steps, order=1, spacing="uniform", clip_denoised=True)
    np.testing.assert_allclose(got, ddim, rtol=0, atol=2e-4)


def _exact_at_sigma_min(x_T):
    """The probability flow ODE's solution at t = 0 (float64 closed form)."""
    ab = ABAR.astype(np.float64)
    a_T, a_0 = np.sqrt(ab[-1]), np.sqrt(ab[0])
    z = (np.asarray(x_T, np.float64) - a_T * MU) / np.sqrt(a_T**2 * SD**2 + 1 - ab[-1])
    return a_0 * MU + np.sqrt(a_0**2 * SD**2 + 1 - ab[0]) * z


@pytest.mark.parametrize("order, rate", [(1, (1.7, 2.3)), (2, (3.2, 5.0)), (3, (5.5, 12.0))])
def test_converges_with_the_order_it_claims(order, rate):
    # Integer timesteps ("time"), so that the network is exact at every level it is asked
    # about, and final_sigma="sigma_min": the solve stops at t = 0, where the ODE's solution is
    # known (a last step to sigma = 0 returns E[x_0 | x_t], which is not the ODE's end point).
    # The error of an order-p solver shrinks 2^p-fold per doubling of the steps (measured: 1.99,
    # 4.12, 7.4 from 100 to 200 steps); the ranges leave room for the lower-order start.
    x_T = _x_T(256)
    exact = _exact_at_sigma_min(x_T)
    errors = []
    for k in (50, 100, 200):
        got = np.asarray(_dpm(x_T, num_steps=k, order=order, spacing="time",
                              final_sigma="sigma_min"), np.float64)  # fmt: skip
        errors.append(np.max(np.abs(got - exact)))
        # The sample's mean and variance converge to the marginal at t = 0 alike.
    assert errors[0] > errors[1] > errors[2], errors
    assert rate[0] <= errors[1] / errors[2] <= rate[1], errors
    moments = np.array([got.mean() - exact.mean(), got.var() - exact.var()])
    assert np.all(np.abs(moments) <= errors[2]), (moments, errors)


def test_noise_levels_and_step_orders():
    for spacing in choices.DPM_SPACINGS:
        levels, t = dpm_solver.noise_levels(SCHEDULE, 12, spacing)
        levels, t = np.asarray(levels), np.asarray(t)
        assert levels.shape == (13,) and t.shape == (12,) and t.dtype == np.int32
        assert np.all(np.diff(levels) < 0) and levels[-1] == 0, spacing
        assert 0 <= t.min() and t.max() <= 999
    # Multistep warm-up, lower orders at the end below 15 steps, order 1 into sigma = 0.
    np.testing.assert_array_equal(dpm_solver.step_orders(10, 3), [1, 2, 3, 3, 3, 3, 3, 3, 2, 1])
    np.testing.assert_array_equal(dpm_solver.step_orders(20, 3)[-3:], [3, 3, 1])
    np.testing.assert_array_equal(dpm_solver.step_orders(20, 3, "sigma_min")[-2:], [3, 3])
    np.testing.assert_array_equal(dpm_solver.step_orders(1, 2), [1])
    with pytest.raises(ValueError, match="spacing = 'cosine'"):
        dpm_solver.noise_levels(SCHEDULE, 10, "cosine")
    with pytest.raises(ValueError, match="order = 4"):
        _dpm(_x_T(), num_steps=10, order=4)


def test_zero_length_last_step_is_finite():
    # logsnr ends its levels at sigma_min; with final_sigma="sigma_min" the last step has h = 0.
    got = _dpm(_x_T(), num_steps=20, order=3, spacing="logsnr", final_sigma="sigma_min")
    assert np.all(np.isfinite(np.asarray(got)))


def test_tables_agree_with_the_names_the_command_lines_check():
    assert tuple(sampling.SAMPLERS) == choices.SAMPLERS
    assert tuple(dpm_solver.SPACINGS) == choices.DPM_SPACINGS


def test_on_two_devices_each_half_is_the_single_device_run():
    # sample_pmapped splits x_T over the devices; the solver is deterministic given x_T.
    devices = jax.local_devices()[:2]
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    x_T = _x_T(8)
    both = sampling.sample_pmapped(jax_model("eps"), SCHEDULE, jax.random.key(1), x_T.shape,
                                   sampler="dpm++", devices=devices, x_T=x_T, num_steps=8,
                                   clip_denoised=False)  # fmt: skip
    np.testing.assert_allclose(both[:4], _dpm(x_T[:4], num_steps=8), atol=1e-6)
    np.testing.assert_allclose(both[4:], _dpm(x_T[4:], num_steps=8), atol=1e-6)


def test_clipping_and_thresholding_bound_the_data_predictions():
    x_T = 3.0 * _x_T(16)
    for kw in ({"clip_denoised": True}, {"thresholding": True, "clip_denoised": False}):
        _, traj = _dpm(x_T, num_steps=6, return_trajectory=True, **kw)
        assert float(jnp.max(jnp.abs(traj.pred_x0))) <= 1.0 + 1e-6, kw
