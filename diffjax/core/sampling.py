"""Samplers of the reverse process: ancestral DDPM and DDIM, each one ``lax.scan``.

Both samplers are pure functions of ``(model_fn, schedule, rng, shape)``: the schedule is an
ordinary pytree argument (it may be traced under ``jax.jit``); ``shape`` and the options are
static. Call them inside ``jax.jit`` (or through :func:`diffjax.load_run`), which compiles the
whole sampling loop into one program.

Model contract: ``model_fn(x_t [B, H, W, C], t int32 [B], **model_kwargs) -> [B, H, W, C or 2C]``
with ``t`` the ORIGINAL 0-indexed timestep the network was trained on, also when sampling on a
respaced subset of the steps (Nichol & Dhariwal 2021 Sec. 4). :func:`make_model_fn` builds one
from a U-Net, its parameters, class labels and a classifier-free guidance scale.

Random keys (all derived from ``rng``, no host state): ``init_key, step_key = split(rng)``;
x_T ~ N(0, I) is drawn with ``init_key`` and the noise of the step with (respaced) index ``i``
with ``fold_in(step_key, i)``. Keys therefore depend on the step index, not on the loop
iteration, and the DDPM and DDIM samplers draw identical noise for identical ``rng``.
:func:`sample_pmapped` gives device ``d`` the key ``fold_in(rng, d)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffjax.core import diffusion
from diffjax.core.dpm_solver import dpm_solver_sample
from diffjax.core.respacing import check_int, respace_schedule, space_timesteps, spaced_schedule
from diffjax.core.sampling_loop import (
    Trajectory,
    check_options,
    check_shape,
    initial_noise,
    run_steps,
)
from diffjax.core.schedules import Schedule
from diffjax.core.unipc import unipc_sample

__all__ = [
    "SAMPLERS",
    "ModelFn",
    "Trajectory",
    "ddim_sample",
    "dpm_solver_sample",
    "make_model_fn",
    "respace_schedule",
    "sample",
    "sample_pmapped",
    "space_timesteps",
    "unipc_sample",
]

Array = jax.Array
ModelFn = Callable[..., Array]

_AXIS = "batch"  # mesh axis over which sample_pmapped splits the batch


# --- the model function -----------------------------------------------------------------------


def _is_static_zero(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and float(value) == 0.0


def _batch_labels(y: Any, batch: int) -> Array | None:
    if y is None:
        return None
    y = jnp.asarray(y, jnp.int32)
    if y.ndim == 0:
        return jnp.full((batch,), y, jnp.int32)
    if y.shape != (batch,):
        raise ValueError(f"class labels y have shape {y.shape}; allowed: a scalar or [{batch}]")
    return y


def make_model_fn(
    model: Any, params: Any, *, y: Any = None, guidance_scale: float = 0.0
) -> ModelFn:
    """``model_fn(x_t, t, y=y)`` of a (class-conditional) U-Net, evaluated without dropout.

    With ``guidance_scale`` w != 0, classifier-free guidance (Ho & Salimans 2022 eq. 6):
    eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null), null = ``model.num_classes``; the conditional
    and unconditional outputs come from ONE call on the batch of 2B. Only the first C (mean)
    channels are guided; a learned variance (last C channels) is the conditional one. With w = 0
    (a Python number) the model runs once, on the labels alone.

    :param model: a flax module with ``apply(variables, x, t, y, train=False)`` and
        ``num_classes`` (0/None for an unconditional model), e.g. :class:`diffjax.models.UNet`.
    :param y: class labels, an int or int32 [B]; None is the null class (an unconditional sample
        of a conditional model). Can also be passed per call (``model_kwargs={"y": ...}``).
    :param guidance_scale: w >= 0 (may be traced; then both passes always run).
    """
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    unguided = _is_static_zero(guidance_scale)
    if not num_classes:
        if y is not None:
            raise ValueError("class labels y given, but the model is unconditional (num_classes=0)")
        if not unguided:
            raise ValueError(
                f"guidance_scale = {guidance_scale!r} needs a class-conditional model; "
                "allowed for an unconditional model: 0"
            )
    if isinstance(guidance_scale, int | float) and guidance_scale < 0:
        raise ValueError(f"guidance_scale = {guidance_scale!r}; allowed: a number >= 0")
    variables = {"params": params}
    bound_y = y

    def model_fn(x_t: Array, t: Array, y: Any = bound_y) -> Array:
        b, c = x_t.shape[0], x_t.shape[-1]
        labels = _batch_labels(y, b)  # [B] or None
        if unguided:
            return model.apply(variables, x_t, t, labels, train=False)
        if labels is None:
            raise ValueError(
                "classifier-free guidance needs class labels y; got None (the null class)"
            )
        null = jnp.full((b,), num_classes, jnp.int32)
        out = model.apply(
            variables,
            jnp.concatenate([x_t, x_t]),  # [2B, H, W, C]
            jnp.concatenate([t, t]),
            jnp.concatenate([labels, null]),
            train=False,
        )  # [2B, H, W, C or 2C]
        cond, uncond = out[:b], out[b:]
        w = guidance_scale
        guided = (1.0 + w) * cond[..., :c] - w * uncond[..., :c]
        return jnp.concatenate([guided, cond[..., c:]], axis=-1)

    return model_fn


# --- the scan over steps ----------------------------------------------------------------------


def sample(
    model_fn: ModelFn,
    schedule: Schedule,
    rng: Array,
    shape: Sequence[int],
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
    timesteps: Sequence[int] | np.ndarray | None = None,
    return_trajectory: bool = False,
    trajectory_stride: int = 1,
    x_T: Array | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Array | tuple[Array, Trajectory]:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2, as one ``lax.scan`` over the steps.

    x_T ~ N(0, I); for each step t (descending): x_{t-1} = mu_theta(x_t, t) + sigma_t z with
    z ~ N(0, I), and z = 0 at the last step (t = 0, the paper's t = 1), which returns the mean.
    mu_theta and sigma_t come from :func:`diffusion.p_mean_variance` (Ho et al. eq. 11 / eq. 7
    at the clipped x_0 estimate; learned variances by Nichol & Dhariwal 2021 eq. 15).

    :param model_fn: ``model_fn(x_t, t, **model_kwargs)``, t the ORIGINAL timesteps int32 [B].
    :param schedule: the schedule the model was trained with (a pytree; may be traced).
    :param rng: a PRNG key; see the module docstring for how keys are derived.
    :param shape: (B, H, W, C) of the samples (static).
    :param timesteps: a strictly increasing subset of range(T) to sample on, e.g.
        ``space_timesteps(T, K)``: the schedule is respaced to keep alphas_cumprod at those steps
        (Nichol & Dhariwal 2021 Sec. 4) and the model is fed the original ids. None: all T.
    :param return_trajectory: also return a :class:`Trajectory` of the steps with (respaced)
        index i % trajectory_stride == 0 (always including the last step).
    :param x_T: the initial noise [B, H, W, C] instead of a draw from ``rng``.
    :param model_kwargs: extra keyword arguments of ``model_fn`` (e.g. ``{"y": labels}``).
    :return: samples float32 [B, H, W, C] (or (samples, trajectory)).
    """
    check_options(mean_type, var_type, trajectory_stride)
    shape = check_shape(shape)
    spaced, tmap = spaced_schedule(schedule, timesteps)
    kwargs = dict(model_kwargs or {})
    init_key, step_key = jax.random.split(rng)
    tmap_j = jnp.asarray(tmap)

    def step(x: Array, i: Array) -> tuple[Array, tuple[Array, Array]]:
        t = jnp.full((shape[0],), i, jnp.int32)  # [B], index into the (respaced) schedule
        out = model_fn(x, jnp.full((shape[0],), tmap_j[i], jnp.int32), **kwargs)
        pmv = diffusion.p_mean_variance(
            spaced, out, x, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
        )
        noise = jax.random.normal(jax.random.fold_in(step_key, i), shape, x.dtype)
        std = jnp.where(i > 0, jnp.exp(0.5 * pmv.log_variance), 0.0)  # no noise at t = 0
        return pmv.mean + std * noise, (x, pmv.pred_x0)

    x = initial_noise(init_key, shape, x_T)
    indices = np.arange(tmap.size - 1, -1, -1, dtype=np.int32)  # K-1, ..., 0
    return run_steps(
        step,
        x,
        indices,
        tmap,
        return_trajectory=return_trajectory,
        stride=trajectory_stride,
    )


def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    rng: Array,
    shape: Sequence[int],
    *,
    num_steps: int | None = 50,
    eta: float = 0.0,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
    return_trajectory: bool = False,
    trajectory_stride: int = 1,
    x_T: Array | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Array | tuple[Array, Trajectory]:
    """DDIM sampling, Song et al. 2021 eq. 12, as one ``lax.scan`` over ``num_steps`` steps.

    x_{t-1} = sqrt(abar_{t-1}) x0^ + sqrt(1 - abar_{t-1} - sigma_t^2) eps^ + sigma_t z, with
    sigma_t^2 = eta^2 (1 - abar_{t-1}) / (1 - abar_t) (1 - abar_t / abar_{t-1}) (Song et al.
    eq. 16), i.e. eta^2 times the posterior variance of the respaced schedule. eta = 0 is
    deterministic given x_T; eta = 1 is ancestral sampling with sigma_t^2 = beta tilde_t (it
    equals :func:`sample` with ``var_type="fixed_small"`` on the same steps and ``rng``).

    The steps are ``space_timesteps(T, num_steps)``, abar taken at those steps; the model sees
    the original ids. x0^ and eps^ come from the model's first C channels (a learned variance
    is ignored) for any ``mean_type``; with ``clip_denoised`` eps^ is recomputed from the
    clipped x0^ so that the two stay consistent.

    :param num_steps: K in [1, T]; None means all T steps.
    :param eta: >= 0 (may be traced).
    :return: samples float32 [B, H, W, C] (or (samples, trajectory), as :func:`sample`).
    """
    check_options(mean_type, var_type, trajectory_stride)
    shape = check_shape(shape)
    if isinstance(eta, int | float) and not eta >= 0:
        raise ValueError(f"eta = {eta!r}; allowed: a number >= 0")
    n = schedule.num_timesteps
    k = n if num_steps is None else check_int("num_steps", num_steps, 1, n)
    spaced, tmap = respace_schedule(schedule, space_timesteps(n, k))
    kwargs = dict(model_kwargs or {})
    init_key, step_key = jax.random.split(rng)
    tmap_j = jnp.asarray(tmap)
    # 1 - abar_{t-1}, 0 before the first step; exp of the stored log avoids 1 - abar cancelling.
    om_prev = jnp.concatenate(
        [jnp.zeros((1,), jnp.float32), jnp.exp(spaced.log_one_minus_alphas_cumprod[:-1])]
    )  # [K]
    recompute_eps = clip_denoised or mean_type == "x0"

    def step(x: Array, i: Array) -> tuple[Array, tuple[Array, Array]]:
        t = jnp.full((shape[0],), i, jnp.int32)  # [B]
        out = model_fn(x, jnp.full((shape[0],), tmap_j[i], jnp.int32), **kwargs)
        mean_out, _ = diffusion.split_model_output(out, x, var_type)
        pred_x0 = diffusion.predict_x0(spaced, x, t, mean_out, mean_type)
        if clip_denoised:
            pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        if recompute_eps:
            eps = diffusion.predict_eps_from_x0(spaced, x, t, pred_x0)
        else:
            eps = diffusion.predict_eps(spaced, x, t, mean_out, mean_type)
        sigma = eta * jnp.sqrt(spaced.posterior_variance[i])  # Song et al. eq. 16
        direction = jnp.sqrt(jnp.maximum(om_prev[i] - sigma**2, 0.0))
        noise = jax.random.normal(jax.random.fold_in(step_key, i), shape, x.dtype)
        x_prev = jnp.sqrt(spaced.alphas_cumprod_prev[i]) * pred_x0 + direction * eps
        return x_prev + sigma * noise, (x, pred_x0)

    x = initial_noise(init_key, shape, x_T)
    indices = np.arange(k - 1, -1, -1, dtype=np.int32)
    return run_steps(
        step,
        x,
        indices,
        tmap,
        return_trajectory=return_trajectory,
        stride=trajectory_stride,
    )


SAMPLERS: dict[str, Callable[..., Any]] = {
    "ddpm": sample,
    "ddim": ddim_sample,
    "dpm++": dpm_solver_sample,
    "sde-dpm++": functools.partial(dpm_solver_sample, sde=True),
    "unipc": unipc_sample,
}


# --- several devices --------------------------------------------------------------------------


def sample_pmapped(
    model_fn: ModelFn,
    schedule: Schedule,
    rng: Array,
    shape: Sequence[int],
    *,
    sampler: str = "ddpm",
    devices: Sequence[jax.Device] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    x_T: Array | None = None,
    **sampler_kwargs: Any,
) -> Array | tuple[Array, Trajectory]:
    """Sample a batch split evenly across devices (data parallel, ``jax.shard_map``).

    Device d (position in ``devices``) samples rows [d b, (d + 1) b) of the batch, b = B / D,
    with ``SAMPLERS[sampler](model_fn, schedule, fold_in(rng, d), (b, H, W, C), ...)``; the
    leaves of ``model_kwargs`` (e.g. labels [B]) and ``x_T`` are split the same way, and every
    array ``model_fn`` closes over (the parameters) is replicated. Jittable.

    :param sampler: ``"ddpm"`` (:func:`sample`) or ``"ddim"`` (:func:`ddim_sample`).
    :param devices: default ``jax.local_devices()``; B must be divisible by their number.
    :param sampler_kwargs: the sampler's keyword options (``timesteps``, ``num_steps``, ...).
    :return: as the sampler, with the batch (axis 0, or axis 1 of trajectories) gathered.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    shape = check_shape(shape)
    devices = tuple(jax.local_devices() if devices is None else devices)
    n = len(devices)
    if n == 0 or shape[0] % n:
        raise ValueError(
            f"batch size {shape[0]} is not divisible by the number of devices ({n}); "
            f"allowed: a multiple of {n}"
        )
    local_shape = (shape[0] // n, *shape[1:])
    fn = SAMPLERS[sampler]
    sharded = {"model_kwargs": dict(model_kwargs or {}), "x_T": x_T}

    def per_device(rng: Array, schedule: Schedule, sharded: dict[str, Any]) -> Any:
        key = jax.random.fold_in(rng, jax.lax.axis_index(_AXIS))
        return fn(
            model_fn,
            schedule,
            key,
            local_shape,
            model_kwargs=sharded["model_kwargs"],
            x_T=sharded["x_T"],
            **sampler_kwargs,
        )

    out_specs: Any = P(_AXIS)
    if sampler_kwargs.get("return_trajectory", False):
        out_specs = (P(_AXIS), Trajectory(t=P(), x_t=P(None, _AXIS), pred_x0=P(None, _AXIS)))
    mapped = jax.shard_map(
        per_device,
        mesh=Mesh(np.asarray(devices), (_AXIS,)),
        in_specs=(P(), P(), P(_AXIS)),
        out_specs=out_specs,
    )
    return jax.jit(mapped)(rng, schedule, sharded)
