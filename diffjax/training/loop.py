"""The training loop: ``train_and_evaluate(config, workdir)``, from one CPU to a TPU pod.

What a run does (see ``train.py`` for the command line; usable from a notebook as well)::

    from diffjax.training import loop as training
    from configs import digits
    result = training.train_and_evaluate(digits.get_config(), "workdirs/digits")

1. validates the config for this topology (global batch divisible by all devices), checks
   that the dataset is prepared and that the workdir can be written (creating it);
2. builds the U-Net, the schedule and the optimizer, and resumes from the latest readable
   checkpoint in ``workdir/checkpoints`` when there is one: parameters, EMA, Adam moments and
   the step, which is also the position in the data stream (batch k is a pure function of
   (seed, k, process), see ``diffjax.data.pipeline``) and in the key stream. A checkpoint
   whose shapes do not fit the config is an error naming the leaves; an unreadable one is set
   aside with a warning (``diffjax.training.checkpointing``);
3. writes ``workdir/config.json`` (warning about every key that changed on a resume) and
   TensorBoard events (process 0 only);
4. runs the data-parallel step (``diffjax.training.step``) on all local devices, logging loss,
   gradient norm, learning rate and images/s every ``log_every_steps``, saving a checkpoint
   every ``checkpoint_every_steps`` and a PNG grid of samples from the EMA parameters every
   ``sample_every_steps`` (and all three at the end);
5. on SIGTERM/SIGINT (``diffjax.training.preemption``) finishes the current step, writes a
   checkpoint, waits until it is complete, prints where it is and returns (``stopped_early``);
   no samples;
6. on a non-finite loss or gradient (the update is always skipped on the device):
   ``training.nan_policy="stop"`` raises :class:`NonFiniteError` naming the step and the last
   good checkpoint; ``"skip"`` goes on, and raises once more than
   ``training.max_consecutive_skips`` steps in a row were skipped.

Multi-host. Every process runs the same program on its local devices; the global batch is
split evenly over processes and their devices. Call :func:`initialize_distributed` first
(``train.py`` does): it calls ``jax.distributed.initialize()`` only when the environment
describes several processes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import jax_utils
from tqdm import tqdm

from diffjax.config.validation import validate_config
from diffjax.core.schedules import Schedule, make_schedule
from diffjax.data import images
from diffjax.data import pipeline as input_pipeline
from diffjax.errors import ReportableError
from diffjax.kernels import onednn
from diffjax.models import create_model
from diffjax.run import resolve_sampling_options, sample_with_params
from diffjax.training import checkpointing, watchdog
from diffjax.training.metrics import MetricWriter, format_metrics
from diffjax.training.multihost import initialize_distributed, multiprocess_requested
from diffjax.training.preemption import StopGuard
from diffjax.training.state import TrainState, create_train_state
from diffjax.training.step import AXIS_NAME, make_p_train_step, per_device_batch_size
from diffjax.training.workdir import WorkdirError, config_changes, prepare_workdir, record_config

__all__ = [
    "NonFiniteError",
    "STOP_SYNC_EVERY_STEPS",
    "TrainResult",
    "WorkdirError",
    "config_changes",
    "initialize_distributed",
    "make_sample_fn",
    "multiprocess_requested",
    "train_and_evaluate",
]

# Independent key streams derived from training.seed.
_INIT_STREAM, _STEP_STREAM, _SAMPLE_STREAM = 0, 1, 2
# In multi-process runs a signal caught in Python is agreed on with an all-gather this often
# (SIGTERM under jax.distributed goes through JAX's preemption service at every step instead).
STOP_SYNC_EVERY_STEPS = 10


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train_and_evaluate` returns.

    ``state``: the final (unreplicated) TrainState; ``metrics``: the last logged metrics
    (empty when no step ran); ``stopped_early``: True after a SIGTERM/SIGINT stop.
    """

    state: TrainState
    metrics: dict[str, float]
    workdir: str
    stopped_early: bool = False


# --- pieces of the loop -----------------------------------------------------------------------


def _shard(batch: Mapping[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """[local_batch, ...] -> [num_devices, local_batch / num_devices, ...] for pmap."""
    return {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in batch.items()}


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Average of the per-step metrics (already pmean'd: replica 0 holds the global value)."""
    host = jax.device_get([{k: v[0] for k, v in m.items()} for m in history])
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def make_sample_fn(
    config: ml_collections.ConfigDict, model: Any, schedule: Schedule
) -> Callable[[Any, jax.Array], jax.Array]:
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
    labels = jnp.arange(n, dtype=jnp.int32) % num_classes if num_classes else None
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


def _write_samples(
    sample_fn: Callable[[Any, jax.Array], jax.Array],
    ema_params: Any,
    rng: jax.Array,
    step: int,
    workdir: epath.Path,
    writer: MetricWriter,
) -> epath.Path:
    samples = np.asarray(sample_fn(ema_params, rng))  # [N, H, W, C] in [-1, 1]
    path = workdir / "samples" / f"step_{step:07d}.png"
    images.save_image_grid(samples, path)
    writer.write_image(step, "samples", images.make_grid(images.to_uint8(samples)))
    return path


def _meta(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    # The data stream and the keys are pure functions of (seed, step): this is all a resume needs.
    return {
        "step": int(step),
        "data_position": int(step),
        "seed": int(config.training.seed),
        "global_batch_size": int(config.training.batch_size),
        "num_processes": jax.process_count(),
    }


def _restore_or_init(
    config: ml_collections.ConfigDict, model: Any, manager: Any, init_key: jax.Array
) -> TrainState:
    state = create_train_state(config, model, init_key)
    restored = checkpointing.restore_training_checkpoint(
        manager, params=state.params, ema_params=state.ema_params, opt_state=state.opt_state
    )
    if restored is None:
        return state
    trees, meta = restored
    return state.replace(step=int(meta["step"]), **trees)


class NonFiniteError(ReportableError):
    """The loss or gradient became non-finite and ``training.nan_policy`` says stop."""


def _nonfinite_action(policy: str, consecutive: int, max_skips: int) -> str:
    """ "skip" or "stop" after ``consecutive`` (>= 1) non-finite steps in a row."""
    actions = {
        "stop": lambda: "stop",
        "skip": lambda: "skip" if consecutive <= max_skips else "stop",
    }
    return actions[policy]()


def _nonfinite_message(
    tc: ml_collections.ConfigDict, step: int, consecutive: int, last_good: str
) -> str:
    first = step - consecutive + 1
    what = (
        f"non-finite loss or gradient at step {step} (training.nan_policy='stop')"
        if tc.nan_policy == "stop"
        else f"non-finite loss or gradient in {consecutive} consecutive steps ({first}-{step}), "
        f"more than training.max_consecutive_skips={tc.max_consecutive_skips}"
    )
    return (
        f"{what}; {last_good}. A restart resumes from it; lower optimizer.learning_rate, or "
        "set training.nan_policy=skip to step over isolated bad batches"
    )


def _console(metrics: Mapping[str, float]) -> dict[str, float]:
    # "skipped" (fraction of skipped updates) only when there were any.
    return {k: v for k, v in metrics.items() if k != "skipped" or v > 0}


# --- the loop ---------------------------------------------------------------------------------


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | epath.PathLike
) -> TrainResult:
    """Train (or resume training) the run in ``workdir`` up to ``training.num_train_steps``.

    :raises diffjax.config.validation.ConfigError: the config is invalid for this topology.
    :raises diffjax.data.pipeline.DatasetNotPreparedError: the dataset needs ``tfds build``.
    :raises WorkdirError: ``workdir`` cannot be created or written.
    :raises diffjax.training.checkpointing.CheckpointMismatchError: the workdir's checkpoint
        does not fit the config (it is never overwritten by a fresh initialisation).
    :raises NonFiniteError: the loss or gradient became non-finite (``training.nan_policy``).
    """
    num_local = jax.local_device_count()
    validate_config(config, num_devices=num_local, num_processes=jax.process_count())
    per_device_batch_size(config.training.batch_size, jax.process_count(), num_local)
    # Fail fast, before writing or compiling anything, when the dataset is not prepared.
    input_pipeline.num_examples(config, config.data.train_split)
    tc = config.training
    workdir = checkpointing.resolve_workdir(workdir)
    ckpt_dir = checkpointing.checkpoint_dir(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        prepare_workdir(workdir)
        print(f"workdir: {workdir}")
        if jax.default_backend() == "cpu":
            print(onednn.describe(jnp.dtype(config.model.dtype)))

    model = create_model(config)
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    seed_key = jax.random.key(tc.seed)
    init_key, step_key, sample_key = (
        jax.random.fold_in(seed_key, s) for s in (_INIT_STREAM, _STEP_STREAM, _SAMPLE_STREAM)
    )
    p_train_step = make_p_train_step(config, model, schedule, step_key)
    sample_fn = make_sample_fn(config, model, schedule)
    keep = ("image", "label") if config.model.num_classes else ("image",)

    history: list[dict[str, jax.Array]] = []
    last_metrics: dict[str, float] = {}
    stopped_early = False
    dog = watchdog.Watchdog(
        watchdog.WatchdogSettings(
            tc.watchdog_factor, tc.watchdog_min_seconds, tc.watchdog_first_seconds
        )
    )
    # Closed in reverse order on any exit; the manager's close waits for pending saves.
    with contextlib.ExitStack() as stack:
        manager = stack.enter_context(
            checkpointing.create_checkpoint_manager(workdir, keep=tc.keep_checkpoints)
        )
        stack.callback(dog.close)  # an error on the way out is reported, not timed out
        # From here on SIGTERM / SIGINT are recorded, not fatal: the loop stops at a step end.
        guard = stack.enter_context(StopGuard(sync_every_steps=STOP_SYNC_EVERY_STEPS))
        state = _restore_or_init(config, model, manager, init_key)
        start_step = last_saved = step = int(state.step)
        if is_main:
            # Only now: a config that does not fit the checkpoint has raised, and the
            # config.json of the trained run is still the one that describes it.
            record_config(workdir, config)
            if start_step:
                print(f"resuming from the checkpoint at step {start_step}")
        writer = MetricWriter(workdir, enabled=is_main)
        stack.callback(writer.close)
        num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        logging.info("model: %d parameters; %d local device(s)", num_params, num_local)
        # Replicated along the mesh axis of the step, so that the second call does not recompile.
        p_state = jax_utils.replicate(state, axis_name=AXIS_NAME)
        del state  # the replicated copy is donated at every step
        train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
        bar = stack.enter_context(
            tqdm(total=tc.num_train_steps, initial=start_step, disable=not is_main, desc="train")
        )
        # (step, "skipped" flag on the device) of steps the host has not looked at yet.
        unchecked: collections.deque[tuple[int, jax.Array]] = collections.deque()
        consecutive_bad = 0
        timer_start, timer_steps = time.perf_counter(), 0
        # Also registers the starting step with JAX's preemption sync (multi-process): a notice
        # that arrives during the first compilation then stops all processes after one step.
        if guard.should_stop(start_step):
            stopped_early = True
            if is_main:
                bar.write(f"stopped by {guard.reason} before the first step: nothing new to save")
        while not stopped_early and step < tc.num_train_steps:
            # One iteration waits for the previous step's flags (below): a step that never
            # finishes stops the iteration, and the watchdog ends the process.
            dog.start("train step", f"step {step + 1}, waiting for the device")
            batch = next(train_iter)
            batch = _shard({k: batch[k] for k in keep}, num_local)
            p_state, metrics = p_train_step(p_state, batch)
            step += 1
            history.append(metrics)
            unchecked.append((step, metrics["skipped"]))
            bar.update(1)
            if step == start_step + 1:
                # Throughput excludes the first step, which compiles.
                jax.block_until_ready(metrics)
                timer_start, timer_steps = time.perf_counter(), 0
            else:
                timer_steps += 1

            # Preemption: every process gets the same answer at the same step
            # (diffjax.training.preemption).
            stop = guard.should_stop(step)
            final = step == tc.num_train_steps or stop
            log_now = step % tc.log_every_steps == 0 or final
            save_now = step % tc.checkpoint_every_steps == 0 or final
            sample_now = is_main and not stop and (step % tc.sample_every_steps == 0 or final)

            # Non-finite steps were already skipped on the device. The host reads the flags one
            # step late (the device runs the newer step meanwhile) and catches up before
            # anything is logged or written. The flags are equal on all processes.
            while len(unchecked) > (0 if log_now or save_now or sample_now else 1):
                bad_step, flag = unchecked.popleft()
                consecutive_bad = consecutive_bad + 1 if float(flag[0]) > 0 else 0
                if not consecutive_bad:
                    continue
                action = _nonfinite_action(tc.nan_policy, consecutive_bad, tc.max_consecutive_skips)
                if action == "stop":
                    manager.wait_until_finished()
                    good = manager.latest_step()
                    last_good = (
                        f"the last good checkpoint is {ckpt_dir / str(good)}"
                        if good is not None
                        else "no checkpoint was written yet"
                    )
                    raise NonFiniteError(
                        _nonfinite_message(tc, bad_step, consecutive_bad, last_good)
                    )
                if is_main:
                    bar.write(
                        f"step {bad_step}: non-finite loss or gradient, update skipped "
                        f"({consecutive_bad} in a row; at most {tc.max_consecutive_skips})"
                    )
            dog.finish()

            if log_now:
                last_metrics = _mean_metrics(history)
                history.clear()
                elapsed = time.perf_counter() - timer_start
                if timer_steps and elapsed > 0:
                    last_metrics["images_per_sec"] = timer_steps * tc.batch_size / elapsed
                timer_start, timer_steps = time.perf_counter(), 0
                writer.write_scalars(step, last_metrics)
                bar.set_postfix(loss=f"{last_metrics['loss']:.4f}")
                if is_main:
                    bar.write(format_metrics(step, _console(last_metrics)))

            if save_now:
                unrep = jax_utils.unreplicate(p_state)
                with dog.watch("checkpoint save", f"checkpoint of step {step}"):
                    checkpointing.save_training_checkpoint(
                        manager,
                        step,
                        params=unrep.params,
                        ema_params=unrep.ema_params,
                        opt_state=unrep.opt_state,
                        meta=_meta(config, step),
                    )
                last_saved = step

            if sample_now:
                # Host copy: the sampler places it on its own devices.
                ema = jax.device_get(jax_utils.unreplicate(p_state.ema_params))
                with dog.watch("sample grid", f"samples of step {step}"):
                    path = _write_samples(sample_fn, ema, sample_key, step, workdir, writer)
                bar.write(f"step {step}: samples in {path}")
                writer.flush()
                timer_start, timer_steps = time.perf_counter(), 0  # images/s: training only

            if stop:
                # No samples on the way out: a preemption notice leaves seconds, not minutes.
                stopped_early = True
                manager.wait_until_finished()  # durable before we say so
                manager.reload()  # what is on storage now, not what was requested
                if is_main:
                    bar.write(
                        f"stopped by {guard.reason} after step {step}: checkpoint "
                        f"{ckpt_dir / str(manager.latest_step())} is complete; run the same "
                        "command to resume"
                    )
                    sys.stdout.flush()
                break
        manager.wait_until_finished()

    if is_main and last_saved and not stopped_early:
        print(f"checkpoint: {ckpt_dir / str(last_saved)}")
    return TrainResult(
        state=jax.device_get(jax_utils.unreplicate(p_state)),
        metrics=last_metrics,
        workdir=str(workdir),
        stopped_early=stopped_early,
    )
