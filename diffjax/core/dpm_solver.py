"""DPM-Solver++ (Lu et al. 2022b): few-step sampling of the probability flow ODE, one ``lax.scan``.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and the half log-SNR
lambda_t = log(alpha_t / sigma_t), the probability flow ODE of a DDPM has the exact solution
(Lu et al. 2022b eq. 8, in the data-prediction form)

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^l x0_theta(x_l) dl.

DPM-Solver++ approximates x0_theta by a polynomial in lambda through the current and the k - 1
previous predictions (multistep, order k = 1, 2, 3) and integrates it exactly. With h = lambda_t -
lambda_s, r_j = h_j / h the ratios of the previous steps to this one, and m_j the predictions:

- order 1 (= DDIM with eta = 0): x_t = (sigma_t/sigma_s) x_s - alpha_t (e^-h - 1) m_0;
- order 2 (2M, "midpoint"): D_1 = (m_0 - m_1) / r_0, x_t = order 1 - alpha_t (e^-h - 1) D_1 / 2;
- order 3 (3M): D_1 = d_0 + r_0/(r_0 + r_1) (d_0 - d_1), D_2 = (d_0 - d_1)/(r_0 + r_1) with
  d_0 = (m_0 - m_1)/r_0, d_1 = (m_1 - m_2)/r_1, and
  x_t = order 1 + alpha_t ((e^-h - 1)/h + 1) D_1 - alpha_t ((e^-h - 1 + h)/h^2 - 1/2) D_2.

SDE-DPM-Solver++ (``sde=True``; Lu et al. 2022b Sec. 5, diffusers' "sde-dpmsolver++") solves the
reverse diffusion SDE instead, in the same variables: each step contracts x_s by e^-h more, puts
(1 - e^-2h) on the data predictions where the ODE puts (1 - e^-h), and adds fresh noise
sigma_t sqrt(1 - e^-2h) z. Like ancestral sampling it forgets early errors (the ODE carries them
to the end), at the price of a slower convergence in the number of steps:

- order 1: x_t = (sigma_t/sigma_s) e^-h x_s + alpha_t (1 - e^-2h) m_0 + sigma_t sqrt(1 - e^-2h) z;
- order 2: order 1 + alpha_t (1 - e^-2h) D_1 / 2;
- order 3: order 1 + alpha_t ((1 - e^-2h)/(-2h) + 1) D_1 + alpha_t ((1 - e^-2h - 2h)/(2h)^2 -
  1/2) D_2, with D_1, D_2 as above.

The first steps use lower orders (no history yet); below 15 steps the last two steps do too, and
the step to sigma = 0 is always of order 1 (it returns the data prediction), as the paper
recommends and diffusers' ``DPMSolverMultistepScheduler`` does: the same steps, noise levels and
updates, so both give the same samples (tests/test_dpm_solver.py).

Noise levels (``spacing``): "logsnr" (uniform in lambda, Lu et al.'s recommendation for few
steps), "time" (``linspace(0, T - 1, K + 1)`` rounded, the largest K dropped), "karras"
(sigma = sqrt((1 - abar)/abar) spaced as Karras et al. 2022 eq. 5, rho = 7), or "uniform" (the
DDIM steps ``space_timesteps(T, K)``, ending at t = 0). The network sees each level's timestep,
rounded to an integer where the level lies between two; the update uses the level itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core import diffusion
from diffjax.core.respacing import check_int, space_timesteps
from diffjax.core.sampling_loop import (
    Trajectory,
    check_options,
    check_shape,
    initial_noise,
    run_steps,
)
from diffjax.core.schedules import Schedule

__all__ = ["FINAL_SIGMAS", "SPACINGS", "data_prediction", "dpm_solver_sample", "noise_levels"]

Array = jax.Array
# Diffusers' lower_order_final: below this many steps, the last two steps use orders 1 and 2.
_LOWER_ORDER_FINAL_BELOW = 15
_KARRAS_RHO = 7.0


def _vp_sigmas(schedule: Schedule) -> Array:
    """sigma_t = sqrt((1 - abar_t) / abar_t) [T], increasing in t (the VE form of the noise)."""
    return jnp.exp(0.5 * (schedule.log_one_minus_alphas_cumprod - jnp.log(schedule.alphas_cumprod)))


def _sigma_to_t(sigma: Array, log_sigmas: Array) -> Array:
    """The fractional timestep of each noise level: linear interpolation in log sigma."""
    log_sigma = jnp.log(jnp.maximum(sigma, 1e-10))
    n = log_sigmas.shape[0]
    low = jnp.clip(jnp.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, n - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = jnp.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def _time(sigmas: Array, k: int) -> tuple[Array, Array]:
    n = sigmas.shape[0]
    steps = np.linspace(0, n - 1, k + 1).round()[::-1][:-1].astype(np.int32)
    return sigmas[steps], jnp.asarray(steps)


def _uniform(sigmas: Array, k: int) -> tuple[Array, Array]:
    steps = space_timesteps(sigmas.shape[0], k)[::-1]
    return sigmas[steps], jnp.asarray(steps)


def _interpolated(levels: Array, sigmas: Array) -> tuple[Array, Array]:
    t = jnp.round(_sigma_to_t(levels, jnp.log(sigmas))).astype(jnp.int32)
    return levels, t


def _karras(sigmas: Array, k: int) -> tuple[Array, Array]:
    ramp = jnp.linspace(0.0, 1.0, k)
    lo, hi = sigmas[0] ** (1 / _KARRAS_RHO), sigmas[-1] ** (1 / _KARRAS_RHO)
    return _interpolated((hi + ramp * (lo - hi)) ** _KARRAS_RHO, sigmas)


def _logsnr(sigmas: Array, k: int) -> tuple[Array, Array]:
    ramp = jnp.linspace(0.0, 1.0, k)
    lo, hi = jnp.log(sigmas[0]), jnp.log(sigmas[-1])
    return _interpolated(jnp.exp(hi + ramp * (lo - hi)), sigmas)


# spacing -> (sigmas [T], K) -> (noise levels [K], decreasing; model timesteps int32 [K])
SPACINGS: dict[str, Callable[[Array, int], tuple[Array, Array]]] = {
    "logsnr": _logsnr,
    "time": _time,
    "karras": _karras,
    "uniform": _uniform,
}
# final_sigma -> the noise level after the last step: 0 (the last step returns the data
# prediction) or that of t = 0 (diffusers' final_sigmas_type="sigma_min").
FINAL_SIGMAS: dict[str, Callable[[Array], Array]] = {
    "zero": lambda sigmas: jnp.zeros((), sigmas.dtype),
    "sigma_min": lambda sigmas: sigmas[0],
}


def noise_levels(
    schedule: Schedule, num_steps: int, spacing: str = "logsnr", final_sigma: str = "zero"
) -> tuple[Array, Array]:
    """(sigma [K + 1] decreasing, the last one ``final_sigma``; model timesteps int32 [K]) of a
    ``num_steps``-step DPM-Solver++ run; sigma = sqrt((1 - abar)/abar). Jittable in ``schedule``.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing = {spacing!r}; allowed: {', '.join(SPACINGS)}")
    if final_sigma not in FINAL_SIGMAS:
        raise ValueError(f"final_sigma = {final_sigma!r}; allowed: {', '.join(FINAL_SIGMAS)}")
    k = check_int("num_steps", num_steps, 1, schedule.num_timesteps)
    sigmas = _vp_sigmas(schedule)
    levels, t = SPACINGS[spacing](sigmas, k)
    levels = jnp.concatenate([levels.astype(jnp.float32), FINAL_SIGMAS[final_sigma](sigmas)[None]])
    return levels, t


def step_orders(num_steps: int, order: int, final_sigma: str = "zero") -> np.ndarray:
    """The order of each step [K]: at most ``order`` and the number of predictions so far,
    lower at the end below 15 steps, 1 for a last step to sigma = 0 (diffusers' rule)."""
    k = num_steps
    orders = np.minimum(order, np.arange(1, k + 1))
    if k < _LOWER_ORDER_FINAL_BELOW:
        orders[-2:] = np.minimum(orders[-2:], [2, 1][-min(k, 2) :])
    if final_sigma == "zero":
        orders[-1] = 1
    return orders.astype(np.int32)


def _alpha_sigma(level: Array) -> tuple[Array, Array, Array]:
    """(alpha_t, sigma_t, lambda_t) of a noise level sigma = sigma_t / alpha_t (VP)."""
    alpha = jax.lax.rsqrt(level**2 + 1.0)
    sigma = level * alpha
    return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)


# x_0 from the network's mean output at the step's (alpha_t, sigma_t), per parameterization.
_DATA_PREDICTION: dict[str, Callable[[Array, Array, Array, Array], Array]] = {
    "eps": lambda x, out, alpha, sigma: (x - sigma * out) / alpha,
    "x0": lambda x, out, alpha, sigma: out,
    "v": lambda x, out, alpha, sigma: alpha * x - sigma * out,
}


def data_prediction(
    model_fn: Callable[..., Array],
    x: Array,
    t: Array,
    alpha: Array,
    sigma: Array,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool,
    thresholding: bool,
    dynamic_thresholding_ratio: float,
    sample_max_value: float,
    model_kwargs: Mapping[str, Any],
) -> Array:
    """x0_theta(x_t) [B, H, W, C] at the level (alpha_t, sigma_t), from the network's first C
    channels (any ``mean_type``), dynamically thresholded or clipped to [-1, 1]: the m_i of the
    multistep solvers (DPM-Solver++, UniPC). ``t``: the timesteps the network sees [B]."""
    out = model_fn(x, t, **model_kwargs)
    mean_out, _ = diffusion.split_model_output(out, x, var_type)
    m = _DATA_PREDICTION[mean_type](x, mean_out, alpha, sigma)
    if thresholding:
        return _threshold(m, dynamic_thresholding_ratio, sample_max_value)
    return jnp.clip(m, -1.0, 1.0) if clip_denoised else m


def _threshold(x0: Array, ratio: float, max_value: float) -> Array:
    """Dynamic thresholding (Saharia et al. 2022 Sec. 2.3): per sample, s = the ``ratio``
    quantile of |x0| clamped to [1, max_value]; x0 -> clip(x0, -s, s) / s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))  # [B, N]
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)  # [B]
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def _ode_coefficients(h: Array) -> tuple[Array, Array, Array, Array, Array]:
    """(c_x, c_0, c_mid, c_1, c_2) of the ODE step: x_t = c_x x_s + alpha_t (c_0 m_0 + c_mid D_1
    at order 2, or + c_1 D_1 + c_2 D_2 at order 3) (the module docstring's updates)."""
    phi = jnp.expm1(-h)  # e^-h - 1, exact for small steps
    return jnp.ones_like(h), -phi, -0.5 * phi, phi / h + 1.0, -((phi + h) / h**2 - 0.5)


def _sde_coefficients(h: Array) -> tuple[Array, Array, Array, Array, Array]:
    """The same for SDE-DPM-Solver++: e^-h on x, 1 - e^-2h where the ODE has 1 - e^-h."""
    psi = -jnp.expm1(-2.0 * h)  # 1 - e^-2h
    return (
        jnp.exp(-h),
        psi,
        0.5 * psi,
        psi / (-2.0 * h) + 1.0,
        (psi - 2.0 * h) / (2.0 * h) ** 2 - 0.5,
    )


# sde -> the update's coefficients from the step length h in lambda
_COEFFICIENTS = {False: _ode_coefficients, True: _sde_coefficients}


def _update(order: Array, x: Array, m: tuple[Array, Array, Array], lam: Array, a_t, s_t, s_s0,
            noise: Array | None = None):  # fmt: skip
    """One (SDE-)DPM-Solver++ step of ``order`` (1, 2, 3; may be traced) from level s0 to t.

    ``lam`` = (lambda_t, lambda_s0, lambda_s1, lambda_s2); ``m`` = (m_0, m_1, m_2); ``noise``
    z [B, ...] for the SDE solver, None for the ODE one."""
    h, h0, h1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
    c_x, c0, c_mid, c1, c2 = _COEFFICIENTS[noise is not None](h)
    first = (s_t / s_s0 * c_x) * x + (a_t * c0) * m[0]
    if noise is not None:
        first = first + (s_t * jnp.sqrt(-jnp.expm1(-2.0 * h))) * noise

    def second():
        d1 = (m[0] - m[1]) * (h / h0)
        return first + (a_t * c_mid) * d1

    def third():
        r0, r1 = h0 / h, h1 / h
        d0, d1 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
        big_d1 = d0 + (r0 / (r0 + r1)) * (d0 - d1)
        big_d2 = (d0 - d1) / (r0 + r1)
        return first + (a_t * c1) * big_d1 + (a_t * c2) * big_d2

    # A step of zero length (the last karras / logsnr level is sigma_min, and so is
    # final_sigma="sigma_min") leaves x as it is; its coefficients would divide by h = 0.
    return jnp.where(h == 0, x, jax.lax.switch(order - 1, (lambda: first, second, third)))


def dpm_solver_sample(
    model_fn: Callable[..., Array],
    schedule: Schedule,
    rng: Array,
    shape: Sequence[int],
    *,
    num_steps: int = 20,
    order: int = 2,
    spacing: str = "logsnr",
    final_sigma: str = "zero",
    sde: bool = False,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    return_trajectory: bool = False,
    trajectory_stride: int = 1,
    x_T: Array | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Array | tuple[Array, Trajectory]:
    """Multistep DPM-Solver++ (Lu et al. 2022b Alg. 2, data prediction), one ``lax.scan``.

    Deterministic given x_T (drawn as in :func:`diffjax.core.sampling.sample` from ``rng``), or
    with ``sde=True`` SDE-DPM-Solver++, whose step i adds noise from ``fold_in(step_key, i)``
    (``init_key, step_key = split(rng)``, as the ancestral sampler). Any ``mean_type`` (the
    network's first C channels; a learned variance is ignored).

    :param num_steps: K network evaluations, in [1, T].
    :param order: 1, 2 or 3 (2 for guided sampling, 3 for unconditional, as the paper advises).
    :param spacing: "logsnr", "time", "karras" or "uniform" (module docstring).
    :param final_sigma: "zero" (the last step returns the data prediction) or "sigma_min".
    :param sde: SDE-DPM-Solver++ (stochastic; module docstring) instead of the ODE solver.
    :param clip_denoised: clip each data prediction to [-1, 1].
    :param thresholding: dynamic thresholding of each data prediction instead (Saharia et al.
        2022), with ``dynamic_thresholding_ratio`` and ``sample_max_value``.
    :return: samples float32 [B, H, W, C] (or (samples, trajectory): the states fed to the
        network and its data predictions, after thresholding or clipping).
    """
    check_options(mean_type, var_type, trajectory_stride)
    shape = check_shape(shape)
    check_int("order", order, 1, 3)
    levels, tsteps = noise_levels(schedule, num_steps, spacing, final_sigma)  # [K + 1], [K]
    k = int(tsteps.shape[0])
    orders = jnp.asarray(step_orders(k, order, final_sigma))  # [K]
    alphas, sigmas, lambdas = _alpha_sigma(levels)  # [K + 1] each
    init_key, step_key = jax.random.split(rng)
    predict = functools.partial(
        data_prediction,
        model_fn,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value,
        model_kwargs=dict(model_kwargs or {}),
    )

    def step(carry: tuple[Array, Array, Array], j: Array):
        x, m1, m2 = carry
        i = k - 1 - j  # forward step index; j counts down so that the last step is j = 0
        t = jnp.full((shape[0],), tsteps[i], jnp.int32)  # [B]
        m0 = predict(x, t, alphas[i], sigmas[i])
        # lambda at t, s0, s1, s2 (entries before the first step are never used: order <= i + 1)
        lam = jnp.stack([lambdas[i + 1], lambdas[i], lambdas[i - 1], lambdas[i - 2]])
        z = jax.random.normal(jax.random.fold_in(step_key, i), shape, x.dtype) if sde else None
        x_new = _update(orders[i], x, (m0, m1, m2), lam, alphas[i + 1], sigmas[i + 1], sigmas[i], z)
        return (x_new, m0, m1), (x, m0)

    x = initial_noise(init_key, shape, x_T)
    zero = jnp.zeros_like(x)
    return run_steps(
        step,
        (x, zero, zero),
        np.arange(k - 1, -1, -1, dtype=np.int32),
        tsteps[::-1],
        return_trajectory=return_trajectory,
        stride=trajectory_stride,
        image=lambda carry: carry[0],
    )
