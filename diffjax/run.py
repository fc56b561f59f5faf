"""A trained run, loaded for inference in one call: config, schedule, U-Net and EMA parameters.

Example (a notebook)::

    import jax, diffjax
    from diffjax.data.images import save_image_grid

    run = diffjax.load_run("workdirs/cifar10")              # latest checkpoint, EMA parameters
    x = run.sample(jax.random.key(0), 16, sampler="ddim", steps=50)  # [16, H, W, C] in [-1, 1]
    save_image_grid(x, "samples.png")

``Run.sample`` is one jitted program (compiled once per shape and options) that splits the batch
across the local devices (:func:`diffjax.core.sampling.sample_pmapped`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from diffjax import choices
from diffjax.core import sampling
from diffjax.core.schedules import Schedule, make_schedule
from diffjax.models import create_model
from diffjax.training import checkpointing

__all__ = ["Run", "load_run", "resolve_sampling_options"]

# Used where a config has no `sampling` section (or lacks a key of it).
_SAMPLING_DEFAULTS = dict(
    sampler="ddpm",
    num_steps=0,
    eta=0.0,
    clip_denoised=True,
    guidance_scale=0.0,
    order=2,
    spacing="logsnr",
)
# DPM-Solver++'s steps where the config or a caller says 0 ("all T" for DDPM and DDIM).
DPM_DEFAULT_STEPS = 20


def _sampling_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    section = config.get("sampling", None)
    given = section.to_dict() if section is not None else {}
    return {k: given.get(k, v) for k, v in _SAMPLING_DEFAULTS.items()}


def _ddpm_options(n: int, steps: int, given: dict[str, Any]) -> dict[str, Any]:
    if steps and steps != n:
        return {"timesteps": tuple(int(s) for s in sampling.space_timesteps(n, steps))}
    return {}


def _ddim_options(n: int, steps: int, given: dict[str, Any]) -> dict[str, Any]:
    return {"num_steps": steps or n, "eta": float(given["eta"])}


def _dpm_options(n: int, steps: int, given: dict[str, Any]) -> dict[str, Any]:
    order, spacing = given["order"], given["spacing"]
    if isinstance(order, bool) or order not in choices.DPM_ORDERS:
        raise ValueError(f"order = {order!r}; allowed: one of {choices.DPM_ORDERS}")
    if spacing not in choices.DPM_SPACINGS:
        raise ValueError(f"spacing = {spacing!r}; allowed: {', '.join(choices.DPM_SPACINGS)}")
    return {"num_steps": steps or min(DPM_DEFAULT_STEPS, n), "order": order, "spacing": spacing}


# sampler -> (T, steps, settings) -> its own keyword options
_SAMPLER_OPTIONS = {
    "ddpm": _ddpm_options,
    "ddim": _ddim_options,
    "dpm++": _dpm_options,
    "sde-dpm++": _dpm_options,
    "unipc": _dpm_options,
}


def resolve_sampling_options(
    config: ml_collections.ConfigDict,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    clip_denoised: bool | None = None,
    order: int | None = None,
    spacing: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The sampler and its keyword options, from the arguments or else ``config.sampling``.

    :param steps: sampling steps K in [1, T], or 0 for all T (DDPM: the respaced steps
        ``space_timesteps(T, K)``; DDIM: ``num_steps``; DPM-Solver++: ``num_steps``, and 0
        means ``DPM_DEFAULT_STEPS``).
    :param order: DPM-Solver++'s order (1, 2, 3); ``spacing``: its noise levels.
    :return: (sampler name, keyword options of ``sampling.SAMPLERS[sampler]``).
    """
    given = _sampling_config(config)
    passed = dict(sampler=sampler, num_steps=steps, eta=eta, clip_denoised=clip_denoised,
                  order=order, spacing=spacing)  # fmt: skip
    given.update({k: v for k, v in passed.items() if v is not None})
    sampler = given["sampler"]
    if sampler not in sampling.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(sampling.SAMPLERS)}")
    n = int(config.diffusion.num_timesteps)
    steps = given["num_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= n:
        raise ValueError(f"steps = {steps!r}; allowed: an integer in [1, T = {n}], or 0 for all T")
    options: dict[str, Any] = dict(
        mean_type=config.diffusion.mean_type,
        var_type=config.diffusion.var_type,
        clip_denoised=bool(given["clip_denoised"]),
    )
    options.update(_SAMPLER_OPTIONS[sampler](n, steps, given))
    return sampler, options


@functools.partial(
    jax.jit, static_argnames=("model", "shape", "sampler", "guidance_scale", "options", "devices")
)
def sample_with_params(
    params: Any,
    schedule: Schedule,
    rng: jax.Array,
    labels: jax.Array | None,
    *,
    model: Any,
    shape: tuple[int, ...],
    sampler: str,
    guidance_scale: float,
    options: tuple[tuple[str, Any], ...],
    devices: tuple[jax.Device, ...],
) -> Any:
    """Samples [num, H, W, C] of ``model`` at ``params``, split over ``devices``; one jitted call.

    ``options`` are the sampler's keyword arguments as sorted (name, value) pairs (static, so
    hashable). The parameters are an argument, not a constant of the program: one compile per
    set of options, shared by training's periodic samples and ``Run.sample``.
    """
    model_fn = sampling.make_model_fn(model, params, guidance_scale=guidance_scale)
    return sampling.sample_pmapped(
        model_fn,
        schedule,
        rng,
        shape,
        sampler=sampler,
        devices=devices,
        model_kwargs={} if labels is None else {"y": labels},
        **dict(options),
    )


@dataclasses.dataclass(frozen=True)
class Run:
    """A run for inference. ``params`` are the EMA parameters of checkpoint ``step``."""

    config: ml_collections.ConfigDict
    schedule: Schedule
    model: Any  # diffjax.models.UNet
    params: Any
    step: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the data the model was trained on."""
        d = self.config.data
        return (int(d.image_size), int(d.image_size), int(d.channels))

    @property
    def num_classes(self) -> int:
        """Number of classes of a class-conditional model (0: unconditional)."""
        return int(getattr(self.model, "num_classes", 0) or 0)

    def model_fn(self, y: Any = None, guidance_scale: float = 0.0) -> sampling.ModelFn:
        """``model_fn(x_t, t)`` of the EMA model (:func:`diffjax.core.sampling.make_model_fn`)."""
        return sampling.make_model_fn(self.model, self.params, y=y, guidance_scale=guidance_scale)

    def sample(
        self,
        rng: jax.Array,
        num: int,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        y: Any = None,
        guidance_scale: float | None = None,
        clip_denoised: bool | None = None,
        order: int | None = None,
        spacing: str | None = None,
        devices: Sequence[jax.Device] | None = None,
        return_trajectory: bool = False,
        trajectory_stride: int = 1,
    ) -> Any:
        """Draw ``num`` samples float32 [num, H, W, C] in [-1, 1] with one jitted call.

        Arguments left None come from ``config.sampling``. ``sampler``: "ddpm" (ancestral, Ho et
        al. 2020 Alg. 2), "ddim" (Song et al. 2021 eq. 12) or "dpm++" (DPM-Solver++, Lu et al.
        2022b, with ``order`` and ``spacing``: :func:`diffjax.core.sampling.dpm_solver_sample`);
        ``steps`` K in [1, T] or 0 for all T (DPM-Solver++: 20); ``y`` class labels (int or
        [num]) of a conditional model, None for its null class; ``guidance_scale`` w of
        classifier-free guidance (needs ``y``; default: the config's when ``y`` is given, else
        0). The batch is split across ``devices`` (``num`` must be a multiple of their number);
        the default is all local devices when ``num`` is a multiple of their number, else the
        first one.
        With ``return_trajectory``, returns (samples, :class:`diffjax.core.sampling.Trajectory`).
        """
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num = {num!r}; allowed: an integer >= 1")
        sampler, options = resolve_sampling_options(
            self.config,
            sampler=sampler,
            steps=steps,
            eta=eta,
            clip_denoised=clip_denoised,
            order=order,
            spacing=spacing,
        )
        if guidance_scale is None:  # the config's scale, where there are labels to guide
            guided = self.num_classes and y is not None
            guidance_scale = float(_sampling_config(self.config)["guidance_scale"]) if guided else 0
        options.update(return_trajectory=return_trajectory, trajectory_stride=trajectory_stride)
        labels = None
        if y is not None:
            labels = jnp.asarray(y, jnp.int32)
            if labels.shape not in ((), (num,)):
                raise ValueError(f"y has shape {labels.shape}; allowed: a scalar or [{num}]")
            labels = jnp.broadcast_to(labels, (num,))
        if devices is None:  # as training's sample grids: all local devices if num divides
            local = jax.local_devices()
            devices = local if num % len(local) == 0 else local[:1]
        devices = tuple(devices)
        return sample_with_params(
            self.params,
            self.schedule,
            rng,
            labels,
            model=self.model,
            shape=(num, *self.image_shape),
            sampler=sampler,
            guidance_scale=float(guidance_scale),
            options=tuple(sorted(options.items())),
            devices=devices,
        )


def load_run(workdir: str | epath.PathLike, step: int | None = None) -> Run:
    """Load the run in ``workdir`` (local or gs://) with the EMA parameters of ``step``.

    :param step: a checkpoint step; None for the latest.
    :raises FileNotFoundError: no such workdir, no config.json, no checkpoint or no such step
        (the message names the path and the steps there are).
    """
    path = epath.Path(workdir)
    if not path.exists():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    config = checkpointing.load_config(path)
    params, restored_step = checkpointing.restore_ema_params(path, step)
    schedule = make_schedule(config.diffusion.schedule, int(config.diffusion.num_timesteps))
    return Run(
        config=config,
        schedule=schedule,
        model=create_model(config),
        # On the default device once, not copied from the host at every call (uncommitted: a
        # jitted call may still place it on other devices).
        params=jax.device_put(params),
        step=int(restored_step),
    )
