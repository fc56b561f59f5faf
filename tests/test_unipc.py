"""UniPC (diffjax.core.unipc) against diffusers' UniPCMultistepScheduler and its claimed order.

The analytic model is the one of tests/test_dpm_solver.py: Gaussian data N(MU, SD^2), whose
exact denoiser gives the network output in closed form, so the two samplers see the same
function and the probability flow ODE has a closed-form solution.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dpm_solver import _OUTPUT, ABAR, MU, SCHEDULE, SD, _dpm, _x0, _x_T, jax_model

from diffjax.core import dpm_solver, unipc

_SPACING = {"time": {}, "karras": {"use_karras_sigmas": True}}


def _unipc(x_T, **kw):
    kw.setdefault("clip_denoised", False)
    model = jax_model(kw.get("mean_type", "eps"))
    return unipc.unipc_sample(model, SCHEDULE, jax.random.key(1), x_T.shape, x_T=x_T, **kw)


def diffusers_unipc(x_T, *, num_steps, order, spacing, mean_type="eps"):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=np.asarray(SCHEDULE.betas, np.float64),
        solver_order=order,
        prediction_type={"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[mean_type],
        solver_type="bh2",
        predict_x0=True,
        **_SPACING[spacing],
    )
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(np.asarray(x_T, np.float64))
    for t in scheduler.timesteps:
        a = float(np.sqrt(np.float64(ABAR[int(t)])))
        s = float(np.sqrt(1.0 - np.float64(ABAR[int(t)])))
        out = _OUTPUT[mean_type](x, _x0(x, a, s), a, s)
        x = scheduler.step(out, t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing, num_steps", [("time", 5), ("karras", 10), ("time", 20)])
def test_equal_to_diffusers_step_for_step(spacing, order, num_steps):
    x_T = _x_T()
    want = diffusers_unipc(x_T, num_steps=num_steps, order=order, spacing=spacing)
    got = _unipc(x_T, num_steps=num_steps, order=order, spacing=spacing)
    # Both run float32 arithmetic on the same noise levels (as DPM-Solver++'s test): a few ulps
    # per step through coefficients <= ~10; a wrong weight, order or corrector moves >= 1e-3.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mean_type", ["x0", "v"])
def test_equal_to_diffusers_for_x0_and_v_models(mean_type):
    x_T = _x_T()
    want = diffusers_unipc(x_T, num_steps=10, order=2, spacing="time", mean_type=mean_type)
    got = _unipc(x_T, num_steps=10, order=2, spacing="time", mean_type=mean_type)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def _exact_final(x_T, num_steps):
    """What a K-step run must return, in float64: the data prediction at the last level the
    network sees (sigma_{K-1}), taken at the probability flow ODE's exact solution there. For
    Gaussian data x_t = MU a_t + (x_T - MU a_T) sqrt(v(a_t) / v(a_T)), v(a) = a^2 SD^2 + 1 - a^2
    (each marginal's quantiles move linearly)."""
    levels, _ = dpm_solver.noise_levels(SCHEDULE, num_steps, "time", "zero")
    sigma = np.float64(levels[num_steps - 1])
    a = 1.0 / np.sqrt(sigma**2 + 1.0)
    a_T = np.sqrt(np.float64(ABAR[-1]))
    v = lambda a: a**2 * SD**2 + (1 - a**2)  # noqa: E731
    x = MU * a + (np.asarray(x_T, np.float64) - MU * a_T) * np.sqrt(v(a) / v(a_T))
    return _x0(x, a, sigma * a)


@pytest.mark.parametrize("order, rate", [(1, 2.5), (2, 3.5)])
def test_the_corrector_raises_the_order(order, rate):
    # The error against the exact answer, for K = 50, 100, 200 steps. UniC adds one order of
    # accuracy at no network call: UniPC-1 shrinks its error ~3x per doubling (measured 2.78,
    # 3.06) where DPM-Solver-1 (= DDIM) shrinks it 2x (1.81, 1.90), UniPC-2 ~4x (3.16, 3.97,
    # the lower-order last steps keep it from 8x at these K) and stays below DPM-Solver++(2M)'s
    # error at every K (by 1.4-2.4x).
    x_T = _x_T(64)
    errs = {}
    for name, fn in (("unipc", _unipc), ("dpm++", _dpm)):
        errs[name] = [
            float(np.max(np.abs(np.asarray(
                fn(x_T, num_steps=k, order=order, spacing="time"), np.float64
            ) - _exact_final(x_T, k))))
            for k in (50, 100, 200)
        ]  # fmt: skip
    u, d = errs["unipc"], errs["dpm++"]
    assert u[0] > u[1] > u[2] and u[1] / u[2] > rate, errs
    assert all(a < b for a, b in zip(u, d, strict=True)), errs


def test_orders_warm_up_and_lower_at_the_end():
    np.testing.assert_array_equal(unipc.unipc_orders(6, 3), [1, 2, 3, 3, 2, 1])
    np.testing.assert_array_equal(unipc.unipc_orders(1, 2), [1])


def test_jitted_with_clipping_gives_bounded_finite_samples():
    x_T = 3.0 * _x_T(16)
    fn = jax.jit(lambda x: _unipc(x, num_steps=8, order=2, clip_denoised=True))
    x = np.asarray(fn(x_T))
    assert np.all(np.isfinite(x)) and np.all(np.abs(x) <= 1.0 + 1e-6)
    assert jnp.asarray(x).shape == x_T.shape
