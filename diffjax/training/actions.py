"""The training loop's periodic outputs: metrics, checkpoints and sample grids.

Each action is a function ``(outputs, progress) -> progress`` (:class:`Outputs` says where they
go, ``diffjax.training.bookkeeping.Progress`` is the loop's state) that
:func:`make_periodic_actions` binds into ``diffjax.training.periodic.PeriodicAction``\\ s:

* every ``training.log_every_steps``: the mean of the step metrics since the last log (loss,
  mse/vlb, grad_norm, learning_rate, skipped) plus images/s, to TensorBoard and the console;
* every ``training.checkpoint_every_steps``: parameters, EMA, Adam moments and the step
  (``diffjax.training.checkpointing``), with the meta that a resume needs;
* every ``training.sample_every_steps``, on process 0 and not on a stop: a PNG grid of samples
  from the EMA parameters (the paper samples from the EMA, Ho et al. 2020 appendix B),
  ``workdir/samples/step_<step>.png``, and the same grid in TensorBoard.

All three also run after the last step.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import jax_utils

from diffjax.core.schedules import Schedule
from diffjax.data import images
from diffjax.run import resolve_sampling_options, sample_with_params
from diffjax.training import checkpointing
from diffjax.training.bookkeeping import Progress, console_metrics, mean_metrics
from diffjax.training.metrics import MetricWriter, format_metrics
from diffjax.training.periodic import PeriodicAction
from diffjax.training.throughput import Throughput
from diffjax.training.watchdog import Watchdog

__all__ = ["Outputs", "checkpoint_meta", "make_periodic_actions", "make_sample_fn"]

SampleFn = Callable[[Any, jax.Array], jax.Array]


def make_sample_fn(config: ml_collections.ConfigDict, model: Any, schedule: Schedule) -> SampleFn:
    """A jitted ``(params, rng) -> samples [num_samples, H, W, C]`` in [-1, 1].

    Uses ``config.sampling``: the sampler ("ddpm": Ho et al. 2020 Alg. 2; "ddim": Song et al.
    2021 eq. 12), its number of steps and eta, clipping of x_0, and for a class-conditional
    model the labels 0, 1, ..., num_classes - 1, 0, ... with classifier-free guidance
    ``guidance_scale`` (Ho & Salimans 2022 eq. 6). The batch is split over the local devices
    when it divides evenly, else it runs on the first one.
    """
    sampler, options = resolve_sampling_options(config)
    n = int(config.sampling.num_samples)
    shape = (n, config.data.image_size, config.data.image_size, config.data.channels)
    num_classes = int(config.model.num_classes or 0)
    labels = jnp.arange(n, dtype=jnp.int32) % num_classes if num_classes else None  # [N]
    guidance = float(config.sampling.guidance_scale) if num_classes else 0.0
    devices = jax.local_devices()
    devices = devices if n % len(devices) == 0 else devices[:1]

    def sample_fn(params: Any, rng: jax.Array) -> jax.Array:
        return sample_with_params(
            params,
            schedule,
            rng,
            labels,
            model=model,
            shape=shape,
            sampler=sampler,
            guidance_scale=guidance,
            options=tuple(sorted(options.items())),
            devices=tuple(devices),
        )

    return sample_fn


def checkpoint_meta(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    """The meta item of the checkpoint of ``step``."""
    # The data stream and the keys are pure functions of (seed, step): this is all a resume needs.
    return {
        "step": int(step),
        "data_position": int(step),
        "seed": int(config.training.seed),
        "global_batch_size": int(config.training.batch_size),
        "num_processes": jax.process_count(),
    }


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where a run's outputs go and what writes them.

    ``bar``: the tqdm progress bar (disabled on processes other than 0), whose ``write`` keeps
    console lines clear of it; ``sample_key``: the key of every sample grid (the same noise at
    every step, so that grids of one run are comparable).
    """

    config: ml_collections.ConfigDict
    workdir: epath.Path
    manager: Any  # orbax.checkpoint.CheckpointManager
    writer: MetricWriter
    watchdog: Watchdog
    bar: Any  # tqdm.tqdm
    is_main: bool
    sample_fn: SampleFn
    sample_key: jax.Array

    def say(self, line: str, *, flush: bool = False) -> None:
        """A console line from process 0 (nothing elsewhere); ``flush``: flush stdout too."""
        if self.is_main:
            self.bar.write(line)
            if flush:
                sys.stdout.flush()


def log_metrics(out: Outputs, progress: Progress) -> Progress:
    """Mean metrics since the last log and images/s to TensorBoard and the console."""
    metrics = mean_metrics(progress.history)
    metrics.update(progress.timer.images_per_sec(out.config.training.batch_size))
    timer = Throughput.started()
    out.writer.write_scalars(progress.step, metrics)
    out.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    out.say(format_metrics(progress.step, console_metrics(metrics)))
    return progress.replace(history=(), metrics=metrics, timer=timer)


def save_checkpoint(out: Outputs, progress: Progress) -> Progress:
    """An (asynchronous) checkpoint of ``progress.step``, under the watchdog."""
    step, unrep = progress.step, jax_utils.unreplicate(progress.p_state)
    with out.watchdog.watch("checkpoint save", f"checkpoint of step {step}"):
        checkpointing.save_training_checkpoint(
            out.manager,
            step,
            params=unrep.params,
            ema_params=unrep.ema_params,
            opt_state=unrep.opt_state,
            meta=checkpoint_meta(out.config, step),
        )
    return progress.replace(last_saved=step)


def write_samples(out: Outputs, progress: Progress) -> Progress:
    """A grid of samples from the EMA parameters to a PNG and TensorBoard, under the watchdog."""
    step = progress.step
    # Host copy: the sampler places it on its own devices.
    ema = jax.device_get(jax_utils.unreplicate(progress.p_state.ema_params))
    with out.watchdog.watch("sample grid", f"samples of step {step}"):
        samples = np.asarray(out.sample_fn(ema, out.sample_key))  # [N, H, W, C] in [-1, 1]
        path = out.workdir / "samples" / f"step_{step:07d}.png"
        images.save_image_grid(samples, path)
        out.writer.write_image(step, "samples", images.make_grid(images.to_uint8(samples)))
    out.bar.write(f"step {step}: samples in {path}")
    out.writer.flush()
    return progress.replace(timer=Throughput.started())  # images/s: training only


def make_periodic_actions(out: Outputs) -> tuple[PeriodicAction[Progress], ...]:
    """Log, checkpoint and samples, in the order they run after a step."""
    tc = out.config.training
    return (
        PeriodicAction("log", tc.log_every_steps, functools.partial(log_metrics, out)),
        PeriodicAction(
            "checkpoint", tc.checkpoint_every_steps, functools.partial(save_checkpoint, out)
        ),
        # No samples on the way out: a preemption notice leaves seconds, not minutes.
        PeriodicAction(
            "samples",
            tc.sample_every_steps,
            functools.partial(write_samples, out),
            on_stop=False,
            enabled=out.is_main,
        ),
    )
