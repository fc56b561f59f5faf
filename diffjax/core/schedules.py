"""Noise schedules as data.

A schedule is the sequence beta_1..beta_T of the forward process (Ho et al. 2020 eq. 2) and
every per-timestep coefficient the rest of diffjax needs, precomputed once in float64 numpy and
stored as float32 arrays of shape [T] in an immutable pytree, so that it can be passed into
jitted functions as an ordinary argument.

Indexing convention: array index ``i`` in ``0..T-1`` is the paper's timestep ``t = i + 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SCHEDULES",
    "Schedule",
    "get_betas",
    "make_schedule",
]

# Ho et al. 2020, Sec. 4: beta_1 = 1e-4 ... beta_T = 0.02 at T = 1000.
_LINEAR_START = 1e-4
_LINEAR_END = 0.02
# Nichol & Dhariwal 2021, Sec. 3.2: offset s and the cap that keeps beta_T away from 1.
_COSINE_S = 0.008
_MAX_BETA = 0.999


def _scaled_endpoints(num_timesteps: int) -> tuple[float, float]:
    """Beta range rescaled by 1000/T so that the total noise matches T=1000 (Nichol & Dhariwal)."""
    scale = 1000.0 / num_timesteps
    return scale * _LINEAR_START, scale * _LINEAR_END


def _linear(num_timesteps: int) -> np.ndarray:
    start, end = _scaled_endpoints(num_timesteps)
    return np.linspace(start, end, num_timesteps, dtype=np.float64)


def _quadratic(num_timesteps: int) -> np.ndarray:
    # Official DDPM "quad": linear in sqrt(beta).
    start, end = _scaled_endpoints(num_timesteps)
    return np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2


def _sigmoid(num_timesteps: int) -> np.ndarray:
    # Sigmoid of a linear ramp over [-6, 6], mapped onto the same beta range as "linear".
    start, end = _scaled_endpoints(num_timesteps)
    ramp = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return start + (end - start) / (1.0 + np.exp(-ramp))


def _cosine(num_timesteps: int) -> np.ndarray:
    # Nichol & Dhariwal 2021 eq. 17: alphabar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2),
    # and beta_t = 1 - alphabar(t)/alphabar(t-1), capped at 0.999.
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + _COSINE_S) / (1.0 + _COSINE_S) * np.pi / 2.0) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], _MAX_BETA)


SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": _linear,
    "cosine": _cosine,
    "quadratic": _quadratic,
    "sigmoid": _sigmoid,
}


def _check_num_timesteps(num_timesteps: object) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int | np.integer):
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return int(num_timesteps)


def get_betas(name: str, num_timesteps: int) -> np.ndarray:
    """The variance schedule beta_1..beta_T of the forward process (Ho et al. 2020 eq. 2).

    :param name: one of ``"linear"`` (Ho et al.: 1e-4 to 0.02 at T=1000, scaled by 1000/T for
        other T as in Nichol & Dhariwal 2021), ``"cosine"`` (Nichol & Dhariwal 2021 eq. 17,
        s=0.008), ``"quadratic"`` (linear in sqrt(beta), official DDPM ``quad``) or
        ``"sigmoid"`` (a sigmoid ramp over the linear schedule's range).
    :param num_timesteps: T, the number of diffusion steps (>= 1).
    :return: float64 array of shape [T]. Every schedule is capped at 0.999: for T < 20 the
        rescaled linear range would otherwise pass 1, which is not a variance.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    betas = np.minimum(SCHEDULES[name](num_timesteps), _MAX_BETA)
    return np.asarray(betas, dtype=np.float64)


def _check_betas(betas: object) -> np.ndarray:
    arr = np.asarray(betas, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"betas must be a 1-D array with at least one step, got shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr <= 0.0) | (arr > 1.0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"betas must be finite and in (0, 1]; betas[{i}] = {arr[i]!r} "
            f"({int(bad.sum())} bad value(s) of {arr.shape[0]})"
        )
    return arr


@flax.struct.dataclass
class Schedule:
    """Per-timestep coefficients of the forward process and its posterior, float32 [T] each.

    Fields (index i is the paper's t = i + 1; abar = alphas_cumprod):

    - ``betas``, ``alphas = 1 - betas``, ``alphas_cumprod`` = abar_t (Ho et al. eq. 4),
      ``alphas_cumprod_prev`` = abar_{t-1} with abar_0 = 1.
    - ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
      ``log_one_minus_alphas_cumprod``: the moments of q(x_t | x_0) (Ho et al. eq. 4).
    - ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``: x_0 from (x_t, eps),
      inverting Ho et al. eq. 4.
    - ``posterior_variance`` = beta tilde_t (Ho et al. eq. 7);
      ``posterior_log_variance_clipped`` = its log with entry 0 replaced by entry 1, since
      beta tilde_1 = 0 (official DDPM code); ``posterior_mean_coef1`` multiplies x_0 and
      ``posterior_mean_coef2`` multiplies x_t in mu tilde_t (Ho et al. eq. 7).
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        """T, static under jit (it is a shape)."""
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray) -> Schedule:
        """All coefficients from beta_1..beta_T, computed in float64 and stored as float32."""
        b = _check_betas(betas)  # [T] float64
        alphas = 1.0 - b
        # abar_t and 1 - abar_t through log1p/expm1: 1 - cumprod(1 - b) cancels to 0 for betas
        # below float64 resolution (and loses digits well before), which would make beta tilde
        # 0/0. beta = 1 gives log abar = -inf from there on: abar = 0 and 1/abar = +inf, exact.
        with np.errstate(divide="ignore"):
            log_ac = np.cumsum(np.log1p(-b))  # [T]
        ac = np.exp(log_ac)
        one_minus_ac = -np.expm1(log_ac)
        ac_prev = np.append(1.0, ac[:-1])
        one_minus_ac_prev = np.append(0.0, one_minus_ac[:-1])
        # Ho et al. eq. 7: beta tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
        post_var = b * one_minus_ac_prev / one_minus_ac
        # beta tilde_1 = 0; the official code clips its log with beta tilde_2. With T = 1 there is
        # no second step, and beta_1 (the only variance left) takes its place.
        first = post_var[1] if b.shape[0] > 1 else b[0]
        post_log_var = np.log(np.append(first, post_var[1:]))
        fields = dict(
            betas=b,
            alphas=alphas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_ac),
            log_one_minus_alphas_cumprod=np.log(one_minus_ac),
            sqrt_recip_alphas_cumprod=np.exp(-0.5 * log_ac),
            # 1/abar - 1 = expm1(-log abar), without the cancellation of 1/abar - 1 near abar = 1.
            sqrt_recipm1_alphas_cumprod=np.sqrt(np.expm1(-log_ac)),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=b * np.sqrt(ac_prev) / one_minus_ac,
            posterior_mean_coef2=one_minus_ac_prev * np.sqrt(alphas) / one_minus_ac,
        )
        return cls(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in fields.items()})


def make_schedule(name: str, num_timesteps: int) -> Schedule:
    """``Schedule.from_betas(get_betas(name, num_timesteps))``."""
    return Schedule.from_betas(get_betas(name, num_timesteps))
