"""Training objectives and the terms of the variational bound.

Log-likelihood terms are in nats elementwise; the per-example terms that training and
evaluation use are averaged over all non-batch dims and converted to bits per dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import choices
from diffjax.core import diffusion
from diffjax.core.schedules import Schedule

__all__ = [
    "HYBRID_LAMBDA",
    "LOSS_TYPES",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
    "prior_bpd",
    "training_losses",
    "vlb_terms_bpd",
]

Array = jnp.ndarray
ModelFn = Callable[[Array, Array], Array]

_LOG2 = float(np.log(2.0))
# Nichol & Dhariwal 2021 Sec. 3.1: L_hybrid = L_simple + lambda L_vlb with lambda = 0.001.
HYBRID_LAMBDA = 0.001
# 8-bit data scaled to [-1, 1] has bins of width 2/255; a pixel at x covers x +- 1/255.
_HALF_BIN = 1.0 / 255.0
# Below this the difference of float32 CDFs nears underflow (Phi(-13) ~ 1e-38); the log-space
# form takes over.
_MIN_DIRECT_MASS = 1e-20


def mean_flat(x: Array) -> Array:
    """Mean over all non-batch dims: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    The closed form used for every L_{t-1} of Ho et al. 2020 eq. 5:
    KL = 1/2 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)),
    evaluated as 1/2 (expm1(d) - d + ...) with d = logvar1 - logvar2: the O(|logvar|) terms of
    the textbook order cancel in float32 to an error ~1e-7 |logvar| that can be negative, while
    this form is exactly 0 for equal arguments and never negative. Arguments broadcast.
    """
    d = logvar1 - logvar2
    return 0.5 * ((jnp.expm1(d) - d) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Array, *, means: Array, log_scales: Array) -> Array:
    """log p(x) of the discretized Gaussian decoder L_0 (Ho et al. 2020 eq. 13), in nats.

    ``x`` holds 8-bit values scaled to [-1, 1]; each value owns the bin x +- 1/255 of
    N(means, exp(log_scales)^2), and the edge bins extend to -inf (x = -1) and +inf (x = 1), so
    the 256 bins' probabilities sum to 1. Uses the exact normal CDF (``ndtr``/``log_ndtr``)
    rather than the official code's tanh approximation. A bin's mass is taken in the lower tail
    (bins above the mean are mirrored), where the CDF does not round to 1; where even that
    underflows float32 (bins ~10 standard deviations out) it is computed from ``log_ndtr`` as
    log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))), so that far-off bins keep a finite,
    accurate log-probability instead of a clamped one.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    upper = inv_std * (centered + _HALF_BIN)  # [B, ...] standardized bin edges
    lower = inv_std * (centered - _HALF_BIN)
    log_cdf_upper = jax.scipy.special.log_ndtr(upper)  # log P(X < upper): the x = -1 bin
    log_sf_lower = jax.scipy.special.log_ndtr(-lower)  # log P(X > lower): the x = +1 bin
    # P(lower < X < upper) = Phi(b) - Phi(a) with a < b in the lower tail: for a bin above the
    # mean, P(-upper < X < -lower).
    above = centered > 0
    b = jnp.where(above, -lower, upper)
    a = jnp.where(above, -upper, lower)
    ndtr = jax.scipy.special.ndtr
    mass = ndtr(b) - ndtr(a)
    log_b = jax.scipy.special.log_ndtr(b)
    log_a = jax.scipy.special.log_ndtr(a)
    # The gap is clamped away from 0 so that the untaken branch has a finite gradient.
    log_tail = log_b + jnp.log(-jnp.expm1(jnp.minimum(log_a - log_b, -1e-30)))
    log_mass = jnp.where(
        mass > _MIN_DIRECT_MASS, jnp.log(jnp.maximum(mass, _MIN_DIRECT_MASS)), log_tail
    )
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_mass))


def vlb_terms_bpd(
    s: Schedule,
    model_output: Array,
    x0: Array,
    x_t: Array,
    t: Array,
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = False,
) -> tuple[Array, Array]:
    """One term of the variational bound per example, in bits/dim (Ho et al. 2020 eq. 5).

    For t > 0 (paper t >= 2) it is L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t));
    for t = 0 (paper t = 1) it is the decoder term L_0 = -log p(x_0 | x_1) (eq. 13).

    :return: (terms [B] in bits/dim, pred_x0 [B, ...]).
    """
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(s, x0, x_t, t)
    out = diffusion.p_mean_variance(
        s, model_output, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
    )
    kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / _LOG2
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, means=out.mean, log_scales=0.5 * out.log_variance)
    )
    decoder_nll = decoder_nll / _LOG2
    return jnp.where(t == 0, decoder_nll, kl), out.pred_x0


def prior_bpd(s: Schedule, x0: Array) -> Array:
    """The prior term L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example [B].

    Ho et al. 2020 eq. 5; it has no parameters, and is ~0 for a schedule whose abar_T ~ 0.
    """
    t = jnp.full((x0.shape[0],), s.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = diffusion.q_mean_variance(s, x0, t)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / _LOG2


def _target(s: Schedule, x0: Array, t: Array, noise: Array, mean_type: str) -> Array:
    targets = {
        "eps": lambda: noise,
        "x0": lambda: x0,
        "v": lambda: diffusion.v_from_x0_eps(s, x0, t, noise),
    }
    return targets[diffusion.check_mean_type(mean_type)]()


def _loss_simple(terms: dict[str, Array], num_timesteps: int) -> Array:
    return terms["mse"]


def _loss_kl(terms: dict[str, Array], num_timesteps: int) -> Array:
    return terms["vlb"]


def _loss_hybrid(terms: dict[str, Array], num_timesteps: int) -> Array:
    # lambda L_vlb with L_vlb = sum_t L_t estimated from one uniformly drawn t as T L_t
    # (Nichol & Dhariwal 2021 eq. 16).
    return terms["mse"] + HYBRID_LAMBDA * num_timesteps * terms["vlb"]


# Which per-example terms each loss needs, and how it combines them.
_LOSSES: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Array], int], Array]]] = {
    "simple": (("mse",), _loss_simple),
    "kl": (("vlb",), _loss_kl),
    "hybrid": (("mse", "vlb"), _loss_hybrid),
}
LOSS_TYPES: tuple[str, ...] = choices.LOSS_TYPES  # the keys of _LOSSES


def check_loss_type(loss_type: str) -> str:
    """Return ``loss_type`` or raise a ValueError that lists the allowed names."""
    if loss_type not in _LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
    return loss_type


def training_losses(
    model_fn: ModelFn,
    s: Schedule,
    x0: Array,
    t: Array,
    noise: Array,
    *,
    loss_type: str = "simple",
    mean_type: str = "eps",
    var_type: str = "fixed_small",
) -> dict[str, Array]:
    """Per-example training losses at x_t = q_sample(x0, t, noise) (Ho et al. 2020 Alg. 1).

    :param model_fn: ``model_fn(x_t [B, ...], t int32 [B]) -> model_output``.
    :param loss_type: ``"simple"``: L_simple (eq. 14), the MSE between the network's output and
        its target (eps, x0 or v by ``mean_type``); ``"kl"``: the bound's term L_{t-1} (L_0 at
        t = 0) in bits/dim; ``"hybrid"``: L_simple + 0.001 T L_{t-1} with the mean's gradient
        stopped in the bound term, so that the bound trains only the learned variance
        (Nichol & Dhariwal 2021 Sec. 3.1).
    :return: dict of [B] arrays: ``"loss"``, and ``"mse"`` and/or ``"vlb"`` (bits/dim).
    """
    check_loss_type(loss_type)
    diffusion.check_mean_type(mean_type)
    diffusion.check_var_type(var_type)
    needed, combine = _LOSSES[loss_type]
    x_t = diffusion.q_sample(s, x0, t, noise)
    model_output = model_fn(x_t, t)
    mean_out, extra = diffusion.split_model_output(model_output, x_t, var_type)

    terms: dict[str, Array] = {}
    if "mse" in needed:
        target = _target(s, x0, t, noise, mean_type)
        terms["mse"] = mean_flat(jnp.square(target - mean_out))
    if "vlb" in needed:
        vlb_output = model_output
        if loss_type == "hybrid":
            frozen = jax.lax.stop_gradient(mean_out)
            vlb_output = frozen if extra is None else jnp.concatenate([frozen, extra], axis=-1)
        terms["vlb"], _ = vlb_terms_bpd(
            s, vlb_output, x0, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=False
        )
    terms["loss"] = combine(terms, s.num_timesteps)
    return terms
