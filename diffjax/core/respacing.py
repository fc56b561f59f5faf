"""Respacing: sampling on a subset of the T training steps (Nichol & Dhariwal 2021 Sec. 4).

:func:`space_timesteps` picks K evenly spaced steps; :func:`respace_schedule` restricts a
(possibly traced) schedule to them while keeping alphas_cumprod there, so the K-step process has
the same marginals q(x_t | x_0) at the kept steps. The samplers in :mod:`diffjax.core.sampling` take
the kept steps as their ``timesteps`` option and feed the model the original step indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core.schedules import Schedule

__all__ = ["check_int", "respace_schedule", "space_timesteps", "spaced_schedule"]


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` as an int, or one ValueError line naming it and the allowed range."""
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ValueError(f"{name} = {value!r}; allowed: {allowed}")
    return int(value)


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """``num_steps`` evenly spaced 0-indexed timesteps of ``num_timesteps``, ends included.

    Step ``k`` of ``K = num_steps`` is ``round(k (T - 1) / (K - 1))`` (half rounded up), so the
    first step is 0 (the paper's t = 1, the only step that returns the mean) and the last is
    T - 1, where x_T ~ N(0, I) matches the forward process best. The spacing is at least 1, so
    the steps are distinct; ``K = T`` gives every step and ``K = 1`` only T - 1.

    :return: int32 [K], strictly increasing.
    """
    t = check_int("num_timesteps", num_timesteps, 1)
    k = check_int("num_steps", num_steps, 1, t)
    if k == 1:
        return np.array([t - 1], dtype=np.int32)
    i = np.arange(k, dtype=np.int64)
    # Integer arithmetic for round(i (T-1) / (K-1)): no float ties, no duplicates.
    return ((2 * i * (t - 1) + (k - 1)) // (2 * (k - 1))).astype(np.int32)


def _check_timesteps(timesteps: Sequence[int] | np.ndarray, num_timesteps: int) -> np.ndarray:
    steps = np.asarray(timesteps)
    if steps.ndim != 1 or steps.size == 0 or not np.issubdtype(steps.dtype, np.integer):
        raise ValueError(
            f"timesteps must be a non-empty 1-D sequence of ints, got {timesteps!r}; "
            "allowed: an increasing subset of range(T), e.g. space_timesteps(T, K)"
        )
    if np.any(np.diff(steps) <= 0) or steps[0] < 0 or steps[-1] >= num_timesteps:
        raise ValueError(
            f"timesteps {steps.tolist()} are not a strictly increasing subset of "
            f"range({num_timesteps}) (T = {num_timesteps})"
        )
    return steps.astype(np.int32)


def respace_schedule(
    schedule: Schedule, timesteps: Sequence[int] | np.ndarray
) -> tuple[Schedule, np.ndarray]:
    """The schedule restricted to ``timesteps`` that keeps alphas_cumprod there (jittable).

    Nichol & Dhariwal 2021 Sec. 4, as :func:`diffjax.core.schedules.respace`, but computed from a
    possibly traced ``schedule`` in float32: every coefficient that depends on alphas_cumprod
    alone is gathered unchanged, and the new beta_i = 1 - prod_{j in (k_{i-1}, k_i]} alpha_j is
    ``-expm1`` of a sum of ``log1p(-beta_j)`` over the skipped steps, which keeps full relative
    precision where beta is small (a ratio of alphas_cumprod would not).

    :param timesteps: strictly increasing 0-indexed steps of ``schedule`` (static).
    :return: (respaced schedule with K steps, timestep_map int32 [K]: the original step of each
        new step, the timestep to feed the model).
    """
    n = schedule.num_timesteps
    kept = _check_timesteps(timesteps, n)  # [K]
    last = int(kept[-1])
    # Original step j in (k_{i-1}, k_i] belongs to new step i; steps after k_K are dropped.
    segment = np.searchsorted(kept, np.arange(last + 1), side="left")  # [k_K + 1]
    log_alpha = jax.ops.segment_sum(
        jnp.log1p(-schedule.betas[: last + 1]), jnp.asarray(segment), num_segments=kept.size
    )  # [K]
    betas = -jnp.expm1(log_alpha)
    alphas = jnp.exp(log_alpha)
    idx = jnp.asarray(kept)
    ac = schedule.alphas_cumprod[idx]
    ac_prev = jnp.concatenate([jnp.ones((1,), ac.dtype), ac[:-1]])
    # 1 - abar from its stored log: 1.0 - abar in float32 cancels when abar is close to 1.
    om = jnp.exp(schedule.log_one_minus_alphas_cumprod[idx])
    om_prev = jnp.concatenate([jnp.zeros((1,), om.dtype), om[:-1]])
    post_var = betas * om_prev / om  # Ho et al. 2020 eq. 7
    first = post_var[1:2] if kept.size > 1 else betas[:1]
    spaced = Schedule(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=schedule.sqrt_alphas_cumprod[idx],
        sqrt_one_minus_alphas_cumprod=schedule.sqrt_one_minus_alphas_cumprod[idx],
        log_one_minus_alphas_cumprod=schedule.log_one_minus_alphas_cumprod[idx],
        sqrt_recip_alphas_cumprod=schedule.sqrt_recip_alphas_cumprod[idx],
        sqrt_recipm1_alphas_cumprod=schedule.sqrt_recipm1_alphas_cumprod[idx],
        posterior_variance=post_var,
        posterior_log_variance_clipped=jnp.log(jnp.concatenate([first, post_var[1:]])),
        posterior_mean_coef1=betas * jnp.sqrt(ac_prev) / om,
        posterior_mean_coef2=om_prev * jnp.sqrt(alphas) / om,
    )
    return spaced, kept


def spaced_schedule(
    schedule: Schedule, timesteps: Sequence[int] | np.ndarray | None
) -> tuple[Schedule, np.ndarray]:
    """(schedule, every step) for ``timesteps=None``, else :func:`respace_schedule`."""
    if timesteps is None:
        return schedule, np.arange(schedule.num_timesteps, dtype=np.int32)
    return respace_schedule(schedule, timesteps)
