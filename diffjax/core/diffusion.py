"""The forward process, its posterior, and the reverse-process parameterizations.

Free functions over a :class:`~diffjax.core.schedules.Schedule`. Throughout:

- ``t`` is an int32 array of shape [B], 0-indexed: ``t = 0`` is the paper's t = 1.
- Per-timestep coefficients are gathered at ``t`` and broadcast over the trailing dims of
  ``x`` (images are [B, H, W, C], but any rank >= 1 works).
- ``abar`` is ``schedule.alphas_cumprod``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

from diffjax import choices
from diffjax.core.schedules import Schedule

__all__ = [
    "MEAN_TYPES",
    "predict_eps",
    "predict_x0",
    "VAR_TYPES",
    "PMeanVariance",
    "extract",
    "model_output_channels",
    "p_mean_variance",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "v_from_x0_eps",
]

Array = jnp.ndarray


def extract(coefs: Array, t: Array, ndim: int) -> Array:
    """Gather ``coefs[t]`` and reshape to [B, 1, ..., 1] with ``ndim`` dims in all."""
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"t must have shape [B], got shape {t.shape}")
    return coefs[t].reshape((t.shape[0],) + (1,) * (ndim - 1))


def _check_batch(t: Array, *xs: Array) -> None:
    t_shape = jnp.shape(t)
    if len(t_shape) != 1:
        raise ValueError(f"t must have shape [B], got shape {t_shape}")
    shapes = [jnp.shape(x) for x in xs]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"arrays must have the same shape, got {shapes}")
    if not shapes[0] or shapes[0][0] != t_shape[0]:
        raise ValueError(f"x has shape {shapes[0]} but t has shape {t_shape}: batch sizes differ")


def q_mean_variance(s: Schedule, x0: Array, t: Array) -> tuple[Array, Array, Array]:
    """Mean, variance and log-variance of q(x_t | x_0) (Ho et al. 2020 eq. 4).

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).
    """
    _check_batch(t, x0)
    mean = extract(s.sqrt_alphas_cumprod, t, x0.ndim) * x0
    # Not 1 - abar in float32: at small t abar is within a few ulps of 1 and the difference keeps
    # only ~3 significant digits; the stored square root is exact to float32 rounding.
    std = extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    variance = jnp.broadcast_to(jnp.square(std), x0.shape)
    log_variance = jnp.broadcast_to(extract(s.log_one_minus_alphas_cumprod, t, x0.ndim), x0.shape)
    return mean, variance, log_variance


def q_sample(s: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """Draw x_t ~ q(x_t | x_0) by reparameterization (Ho et al. 2020 eq. 4 / Alg. 1 line 5).

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
    """
    _check_batch(t, x0, noise)
    return (
        extract(s.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def q_posterior_mean_variance(
    s: Schedule, x0: Array, x_t: Array, t: Array
) -> tuple[Array, Array, Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020 eq. 6-7).

    mu tilde_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
               + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
    beta tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
    At t = 0 (the paper's t = 1) the variance is 0 and the mean is x_0.
    """
    _check_batch(t, x0, x_t)
    mean = (
        extract(s.posterior_mean_coef1, t, x_t.ndim) * x0
        + extract(s.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    variance = jnp.broadcast_to(extract(s.posterior_variance, t, x_t.ndim), x_t.shape)
    log_variance = jnp.broadcast_to(
        extract(s.posterior_log_variance_clipped, t, x_t.ndim), x_t.shape
    )
    return mean, variance, log_variance


def predict_x0_from_eps(s: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), inverting Ho et al. 2020 eq. 4."""
    _check_batch(t, x_t, eps)
    return (
        extract(s.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(s.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )


def predict_eps_from_x0(s: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
    """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1), inverting Ho et al. 2020 eq. 4."""
    _check_batch(t, x_t, x0)
    return (extract(s.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / extract(
        s.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
    )


def v_from_x0_eps(s: Schedule, x0: Array, t: Array, eps: Array) -> Array:
    """The velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022 Sec. 4)."""
    _check_batch(t, x0, eps)
    return (
        extract(s.sqrt_alphas_cumprod, t, x0.ndim) * eps
        - extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
    )


def predict_x0_from_v(s: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022 Sec. 4)."""
    _check_batch(t, x_t, v)
    return (
        extract(s.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
    )


def predict_eps_from_v(s: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v (Salimans & Ho 2022 Sec. 4)."""
    _check_batch(t, x_t, v)
    return (
        extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
        + extract(s.sqrt_alphas_cumprod, t, x_t.ndim) * v
    )


# --- the reverse process p(x_{t-1} | x_t) -----------------------------------------------------


class PMeanVariance(NamedTuple):
    """Moments of p_theta(x_{t-1} | x_t), and the x_0 they were derived from."""

    mean: Array  # [B, ...]
    variance: Array  # [B, ...]
    log_variance: Array  # [B, ...]
    pred_x0: Array  # [B, ...]


def _fixed_small(s: Schedule, extra: Array | None, t: Array, ndim: int) -> tuple[Array, Array]:
    # sigma_t^2 = beta tilde_t (Ho et al. 2020 Sec. 3.2): optimal for x_0 a point mass.
    variance = extract(s.posterior_variance, t, ndim)
    return variance, extract(s.posterior_log_variance_clipped, t, ndim)


def _fixed_large_variances(s: Schedule) -> Array:
    # sigma_t^2 = beta_t (Ho et al. 2020 Sec. 3.2): optimal for x_0 ~ N(0, I). The official code
    # uses beta tilde_2 at the first step so that the decoder's variance is not the tiny beta_1.
    first = s.posterior_variance[1:2] if s.num_timesteps > 1 else s.betas[:1]
    return jnp.concatenate([first, s.betas[1:]])


def _fixed_large(s: Schedule, extra: Array | None, t: Array, ndim: int) -> tuple[Array, Array]:
    variances = _fixed_large_variances(s)
    return extract(variances, t, ndim), extract(jnp.log(variances), t, ndim)


def _learned_range(s: Schedule, extra: Array | None, t: Array, ndim: int) -> tuple[Array, Array]:
    # Nichol & Dhariwal 2021 eq. 15: Sigma = exp(v log beta_t + (1 - v) log beta tilde_t), with
    # the network's output in [-1, 1] mapped to v in [0, 1].
    min_log = extract(s.posterior_log_variance_clipped, t, ndim)
    max_log = extract(jnp.log(s.betas), t, ndim)
    frac = (extra + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    return jnp.exp(log_variance), log_variance


_VARIANCES: dict[str, Callable[[Schedule, Array | None, Array, int], tuple[Array, Array]]] = {
    "fixed_small": _fixed_small,
    "fixed_large": _fixed_large,
    "learned_range": _learned_range,
}

# How the network's (first C channels of) output becomes a prediction of x_0, and of eps.
_PRED_X0: dict[str, Callable[[Schedule, Array, Array, Array], Array]] = {
    "eps": predict_x0_from_eps,
    "x0": lambda s, x_t, t, out: out,
    "v": predict_x0_from_v,
}
_PRED_EPS: dict[str, Callable[[Schedule, Array, Array, Array], Array]] = {
    "eps": lambda s, x_t, t, out: out,
    "x0": predict_eps_from_x0,
    "v": predict_eps_from_v,
}

MEAN_TYPES: tuple[str, ...] = choices.MEAN_TYPES  # the keys of _PRED_X0 and _PRED_EPS
VAR_TYPES: tuple[str, ...] = choices.VAR_TYPES  # the keys of _VARIANCES


def predict_x0(s: Schedule, x_t: Array, t: Array, mean_out: Array, mean_type: str) -> Array:
    """x_0 from the network's mean output under ``mean_type`` (eps: Ho et al. eq. 15)."""
    return _PRED_X0[mean_type](s, x_t, t, mean_out)


def predict_eps(s: Schedule, x_t: Array, t: Array, mean_out: Array, mean_type: str) -> Array:
    """eps from the network's mean output under ``mean_type`` (x0: Ho et al. eq. 4 solved)."""
    return _PRED_EPS[mean_type](s, x_t, t, mean_out)


def check_mean_type(mean_type: str) -> str:
    """Return ``mean_type`` or raise a ValueError that lists the allowed names."""
    if mean_type not in _PRED_X0:
        raise ValueError(f"unknown mean_type {mean_type!r}; allowed: {', '.join(MEAN_TYPES)}")
    return mean_type


def check_var_type(var_type: str) -> str:
    """Return ``var_type`` or raise a ValueError that lists the allowed names."""
    if var_type not in _VARIANCES:
        raise ValueError(f"unknown var_type {var_type!r}; allowed: {', '.join(VAR_TYPES)}")
    return var_type


def model_output_channels(channels: int, var_type: str) -> int:
    """Channels the network must output: C, or 2C when it also predicts the variance."""
    return 2 * channels if check_var_type(var_type) == "learned_range" else channels


def split_model_output(
    model_output: Array, x_t: Array, var_type: str
) -> tuple[Array, Array | None]:
    """(mean part [B,...,C], variance part [B,...,C] or None) of a network output."""
    check_var_type(var_type)
    c = x_t.shape[-1]
    expected = model_output_channels(c, var_type)
    if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != expected:
        raise ValueError(
            f"model_output has shape {model_output.shape}; with var_type={var_type!r} and x_t of "
            f"shape {x_t.shape} it must be {x_t.shape[:-1] + (expected,)}"
        )
    if var_type == "learned_range":
        return model_output[..., :c], model_output[..., c:]
    return model_output, None


def p_mean_variance(
    s: Schedule,
    model_output: Array,
    x_t: Array,
    t: Array,
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
) -> PMeanVariance:
    """Moments of p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta) (Ho et al. 2020 eq. 1, 11).

    The mean is the posterior mean mu tilde_t(x_t, x_0) (eq. 7) at the network's estimate of
    x_0; for ``mean_type="eps"`` this equals Ho et al. eq. 11.

    :param model_output: the network's output at (x_t, t): [B, ..., C] (or 2C for
        ``var_type="learned_range"``, the last C channels being the variance interpolation).
    :param mean_type: what the network predicts: ``"eps"`` (noise, Ho et al.), ``"x0"`` or
        ``"v"`` (Salimans & Ho 2022).
    :param var_type: ``"fixed_small"`` (beta tilde_t), ``"fixed_large"`` (beta_t, beta tilde_2 at
        the first step) or ``"learned_range"`` (Nichol & Dhariwal 2021 eq. 15).
    :param clip_denoised: clip the x_0 estimate to the data range [-1, 1] before taking the mean.
    """
    check_mean_type(mean_type)
    mean_out, extra = split_model_output(model_output, x_t, var_type)
    _check_batch(t, x_t, mean_out)
    variance, log_variance = _VARIANCES[var_type](s, extra, t, x_t.ndim)
    pred_x0 = predict_x0(s, x_t, t, mean_out, mean_type)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(s, pred_x0, x_t, t)
    return PMeanVariance(
        mean=mean,
        variance=jnp.broadcast_to(variance, x_t.shape),
        log_variance=jnp.broadcast_to(log_variance, x_t.shape),
        pred_x0=pred_x0,
    )
