"""UniPC (Zhao et al. 2023): a multistep predictor-corrector for the probability flow ODE, one
``lax.scan``.

In the variables of DPM-Solver++ (``diffjax.core.dpm_solver``: alpha_t, sigma_t, the half log-SNR
lambda_t and the data predictions m_i = x0_theta(x_i)), a step from level s to t (h = lambda_t -
lambda_s) starts from the first-order update x_t' = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h)
m_s and adds a weighted sum of the divided differences D_k = (m_k - m_s) / r_k of earlier
predictions, r_k = (lambda_k - lambda_s) / h (Zhao et al. 2023 Alg. 1-2, data prediction, B(h) =
e^h - 1 in the negated step, their "bh2"):

- **UniP-p** (predictor, order p): x_t = x_t' - alpha_t B(h) sum_k a_k D_k over the p - 1 previous
  predictions, the weights a solving R a = b on the first p - 1 rows (a = 1/2 for p = 2);
- **UniC-p** (corrector): once the network has been evaluated at the predicted x_t (the call the
  next step needs anyway), the same step is taken again with that prediction m_t as one more
  divided difference, D_t = m_t - m_s, weights solving the full p x p system (1/2 for p = 1).
  The corrected x_t replaces the predicted one; m_t itself is not recomputed, so the corrector
  costs no network evaluation and raises the order of accuracy by one.

R[j, k] = r_k^j and b_j = (j + 1)! h phi_{j+2}(h) / B(h) (phi_k the exponential integrator
functions, computed by their recurrence). Orders follow DPM-Solver++'s rule: the first steps use
what history there is, the last ones lower orders (p <= steps left), and the step to sigma = 0
returns the data prediction. The noise levels are DPM-Solver++'s (``spacing``); with them both
give the same samples as diffusers' ``UNIPCMultistepScheduler`` (tests/test_unipc.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core.dpm_solver import _alpha_sigma, data_prediction, noise_levels
from diffjax.core.respacing import check_int
from diffjax.core.sampling_loop import (
    Trajectory,
    check_options,
    check_shape,
    initial_noise,
    run_steps,
)
from diffjax.core.schedules import Schedule

__all__ = ["unipc_orders", "unipc_sample"]

Array = jax.Array
_MAX_ORDER = 3


def unipc_orders(num_steps: int, order: int) -> np.ndarray:
    """The predictor order of each step [K]: at most ``order``, the predictions so far and the
    steps left (diffusers' warm-up and ``lower_order_final``)."""
    i = np.arange(num_steps)
    return np.minimum(np.minimum(order, num_steps - i), i + 1).astype(np.int32)


def _weights(h: Array, r: Array, p: int, full: bool) -> Array:
    """The weights of the divided differences: R a = b with R[j, k] = r_k^j, k < p (r_{p-1} = 1),
    on the first p - 1 rows (predictor) or all p (``full``, corrector). h: the step length."""
    hh = -h
    b_h = jnp.expm1(hh)  # B(h), "bh2"
    h_phi = jnp.expm1(hh) / hh - 1.0  # h phi_2(h) in the negated step, then phi_3, ...
    b = []
    for j in range(p):
        b.append(h_phi * math.factorial(j + 1) / b_h)
        h_phi = h_phi / hh - 1.0 / math.factorial(j + 2)
    n = p if full else p - 1
    rows = jnp.stack([r[:n] ** j for j in range(n)])  # [n, n]
    return jnp.linalg.solve(rows, jnp.stack(b[:n]))


def _step(
    order: int,
    x: Array,
    m: Sequence[Array],
    lam: Array,
    a_t: Array,
    s_t: Array,
    s_s: Array,
    m_t: Array | None,
) -> Array:
    """UniP-``order`` (``m_t`` None) or UniC-``order`` from level s to t.

    ``m`` = (m_s, m_{s-1}, m_{s-2}) the newest predictions first; ``lam`` = (lambda_t,
    lambda_s, lambda_{s-1}, lambda_{s-2})."""
    h = lam[0] - lam[1]
    base = (s_t / s_s) * x - (a_t * jnp.expm1(-h)) * m[0]
    k = order - 1  # previous predictions used
    r = jnp.stack([(lam[2 + j] - lam[1]) / h for j in range(k)] + [jnp.ones_like(h)])
    diffs = [(m[1 + j] - m[0]) / r[j] for j in range(k)]
    if m_t is None:
        if k == 0:
            return base
        a = jnp.full((1,), 0.5) if order == 2 else _weights(h, r, order, full=False)
        res = sum(a[j] * diffs[j] for j in range(k))
    else:
        a = jnp.full((1,), 0.5) if order == 1 else _weights(h, r, order, full=True)
        res = sum((a[j] * diffs[j] for j in range(k)), a[k] * (m_t - m[0]))
    return base - (a_t * jnp.expm1(-h)) * res


def _switch(order: Array, *args) -> Array:
    """``_step`` at a traced order (1 to 3)."""
    branches = [lambda o=o: _step(o, *args) for o in range(1, _MAX_ORDER + 1)]
    return jax.lax.switch(order - 1, branches)


def unipc_sample(
    model_fn: Callable[..., Array],
    schedule: Schedule,
    rng: Array,
    shape: Sequence[int],
    *,
    num_steps: int = 20,
    order: int = 2,
    spacing: str = "time",
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
    """UniPC-p (Zhao et al. 2023, data prediction, B(h) = e^h - 1), one ``lax.scan``.

    Deterministic given x_T (drawn as in :func:`diffjax.core.sampling.sample` from ``rng``). Any
    ``mean_type``; a learned variance is ignored. Options as
    :func:`diffjax.core.dpm_solver.dpm_solver_sample` (``spacing``: its noise levels).

    :param num_steps: K network evaluations, in [1, T].
    :param order: 1, 2 or 3: the predictor's order (the corrector adds one).
    :return: samples float32 [B, H, W, C] (or (samples, trajectory): the predicted states fed to
        the network and its data predictions, after clipping or thresholding).
    """
    check_options(mean_type, var_type, trajectory_stride)
    shape = check_shape(shape)
    check_int("order", order, 1, _MAX_ORDER)
    levels, tsteps = noise_levels(schedule, num_steps, spacing, "zero")  # [K + 1], [K]
    k = int(tsteps.shape[0])
    orders = jnp.asarray(unipc_orders(k, order))  # [K]
    alphas, sigmas, lambdas = _alpha_sigma(levels)  # [K + 1] each
    init_key, _ = jax.random.split(rng)
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

    def lam_at(i: Array) -> Array:  # (lambda_i, lambda_{i-1}, ...); unused entries are clamped
        return jnp.stack([lambdas[jnp.maximum(i - j, 0)] for j in range(4)])

    def step(carry, j: Array):
        x, x_prev, m1, m2, m3 = carry  # x: predicted state at level i; x_prev: the state before
        i = k - 1 - j  # forward step index; j counts down so that the last step is j = 0
        m0 = predict(x, jnp.full((shape[0],), tsteps[i], jnp.int32), alphas[i], sigmas[i])
        # UniC: the last step again, from x_prev at level i - 1, with m0 as one more difference.
        prev = jnp.maximum(i - 1, 0)
        corrected = _switch(
            orders[prev], x_prev, (m1, m2, m3), lam_at(i), alphas[i], sigmas[i], sigmas[prev], m0
        )
        x = jnp.where(i > 0, corrected, x)
        # UniP: from level i to i + 1.
        lam = jnp.stack([lambdas[i + 1], *lam_at(i)[:3]])
        x_new = _switch(
            orders[i], x, (m0, m1, m2), lam, alphas[i + 1], sigmas[i + 1], sigmas[i], None
        )
        return (x_new, x, m0, m1, m2), (x, m0)

    x = initial_noise(init_key, shape, x_T)
    zero = jnp.zeros_like(x)
    return run_steps(
        step,
        (x, zero, zero, zero, zero),
        np.arange(k - 1, -1, -1, dtype=np.int32),
        tsteps[::-1],
        return_trajectory=return_trajectory,
        stride=trajectory_stride,
        image=lambda carry: carry[0],
    )
