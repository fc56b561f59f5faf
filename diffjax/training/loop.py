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
   (seed, k, process), see ``diffjax.data.pipeline``) and in the key stream (the key of step k
   is ``fold_in(fold_in(key(seed), 1), k)``, ``diffjax.training.step``). A checkpoint whose
   shapes do not fit the config is an error naming the leaves; an unreadable one is set aside
   with a warning (``diffjax.training.checkpointing``);
3. writes ``workdir/config.json`` (warning about every key that changed on a resume) and
   TensorBoard events (process 0 only);
4. runs the loop below until ``training.num_train_steps``.

One iteration of the loop, top to bottom:

* get the batch and run the data-parallel step (``diffjax.training.step``) on all local
  devices, under the hang detector (``diffjax.training.watchdog``);
* bookkeeping: the loop's state is one frozen :class:`~diffjax.training.bookkeeping.Progress`
  (step, metrics since the last log, throughput clock from ``diffjax.training.throughput``),
  replaced after every step; the step's non-finite flag is read one step late, and completely
  before any output (``diffjax.training.nonfinite``). A non-finite update is always skipped on
  the device; ``training.nan_policy="stop"`` then raises :class:`NonFiniteError` naming the step
  and the last good checkpoint, ``"skip"`` goes on and raises once more than
  ``training.max_consecutive_skips`` steps in a row were skipped;
* periodic actions (``diffjax.training.periodic``, ``diffjax.training.actions``): loss,
  gradient norm, learning rate and images/s every ``log_every_steps``, a checkpoint every
  ``checkpoint_every_steps``, a PNG grid of samples from the EMA parameters every
  ``sample_every_steps``, and all three after the last step; then evaluation
  (``diffjax.training.evaluation``, ``config.evaluation``): the fixed-noise eval loss every
  ``eval_every_steps``, bits/dim and the sample metric every ``quality_every_steps`` (to
  TensorBoard and ``workdir/eval/step_<step>.json``; both after the last step, neither on a
  stop), with keys of their own that leave the training stream as it is;
* stop handling (``diffjax.training.stopping``): on SIGTERM/SIGINT
  (``diffjax.training.preemption``) the current step is finished, logged and checkpointed (no
  samples), the checkpoint is waited for and named, and the run returns with
  ``stopped_early``.

Multi-host. Every process runs the same program on its local devices; the global batch is
split evenly over processes and their devices. Call :func:`initialize_distributed` first
(``train.py`` does; ``diffjax.training.multihost``): it calls ``jax.distributed.initialize()``
only when the environment describes several processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import jax_utils
from tqdm import tqdm

from diffjax import kernels
from diffjax.config.validation import validate_config
from diffjax.core.schedules import make_schedule
from diffjax.data import pipeline as input_pipeline
from diffjax.models import create_model
from diffjax.training import checkpointing, evaluation, watchdog
from diffjax.training.actions import Outputs, make_periodic_actions, make_sample_fn
from diffjax.training.bookkeeping import Progress
from diffjax.training.metrics import MetricWriter
from diffjax.training.multihost import initialize_distributed, multiprocess_requested
from diffjax.training.nonfinite import NanPolicy, NonFiniteError, catch_up, describe_last_good
from diffjax.training.periodic import due_actions
from diffjax.training.state import TrainState, create_train_state
from diffjax.training.step import AXIS_NAME, make_p_train_step, per_device_batch_size
from diffjax.training.stopping import (
    STOP_SYNC_EVERY_STEPS,
    finish_stop,
    report_end,
    stop_guard,
    stopped_before_first_step,
)
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

# Independent key streams derived from training.seed (evaluation: evaluation.EVAL_STREAM = 3).
_INIT_STREAM, _STEP_STREAM, _SAMPLE_STREAM = 0, 1, 2


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


# --- set-up -----------------------------------------------------------------------------------


def _check_and_prepare(config: ml_collections.ConfigDict, workdir: Any) -> epath.Path:
    """Validate the config for this topology and create the workdir; the resolved workdir."""
    num_local = jax.local_device_count()
    validate_config(config, num_devices=num_local, num_processes=jax.process_count())
    per_device_batch_size(config.training.batch_size, jax.process_count(), num_local)
    # Fail fast, before writing or compiling anything, when the dataset is not prepared.
    input_pipeline.num_examples(config, config.data.train_split)
    workdir = checkpointing.resolve_workdir(workdir)
    if jax.process_index() == 0:
        prepare_workdir(workdir)
        print(f"workdir: {workdir}")
        if jax.default_backend() == "cpu":
            print(kernels.describe(config.model.get("kernels", "tuned"), config.model.dtype))
    return workdir


def _key_streams(seed: int) -> tuple[jax.Array, ...]:
    """The independent keys of initialisation, the training steps, the sample grids and
    evaluation."""
    streams = (_INIT_STREAM, _STEP_STREAM, _SAMPLE_STREAM, evaluation.EVAL_STREAM)
    return tuple(jax.random.fold_in(jax.random.key(seed), s) for s in streams)


def _restore_or_init(
    config: ml_collections.ConfigDict, model: Any, manager: Any, init_key: jax.Array
) -> TrainState:
    """The latest readable checkpoint of ``manager``, else a fresh state from ``init_key``."""
    state = create_train_state(config, model, init_key)
    restored = checkpointing.restore_training_checkpoint(
        manager, params=state.params, ema_params=state.ema_params, opt_state=state.opt_state
    )
    if restored is None:
        return state
    trees, meta = restored
    return state.replace(step=int(meta["step"]), **trees)


def _shard(
    batch: Mapping[str, np.ndarray], keep: tuple[str, ...], num_devices: int
) -> dict[str, np.ndarray]:
    """The ``keep`` fields, [local_batch, ...] -> [num_devices, local_batch / num_devices, ...]
    for pmap."""
    return {k: batch[k].reshape(num_devices, -1, *batch[k].shape[1:]) for k in keep}


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
    workdir = _check_and_prepare(config, workdir)
    tc, num_local, is_main = config.training, jax.local_device_count(), jax.process_index() == 0
    ckpt_dir = checkpointing.checkpoint_dir(workdir)
    model = create_model(config)
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    init_key, step_key, sample_key, eval_key = _key_streams(tc.seed)
    p_train_step = make_p_train_step(config, model, schedule, step_key)
    sample_fn = make_sample_fn(config, model, schedule)
    keep = ("image", "label") if config.model.num_classes else ("image",)
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
        guard = stack.enter_context(stop_guard())
        state = _restore_or_init(config, model, manager, init_key)
        start_step = int(state.step)
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
        # The replicated copy is donated at every step.
        progress = Progress.start(start_step, jax_utils.replicate(state, axis_name=AXIS_NAME))
        del state
        train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
        bar = stack.enter_context(
            tqdm(total=tc.num_train_steps, initial=start_step, disable=not is_main, desc="train")
        )
        out = Outputs(config, workdir, manager, writer, dog, bar, is_main, sample_fn, sample_key)
        evaluator = evaluation.make_evaluator(
            config, workdir, model, schedule, eval_key, stop_requested=lambda: guard.requested
        )
        actions = (*make_periodic_actions(out), *evaluation.make_evaluation_actions(out, evaluator))
        check_flags = functools.partial(
            catch_up,
            policy=NanPolicy.from_config(tc),
            report=out.say,
            last_good=functools.partial(describe_last_good, manager, ckpt_dir),
        )
        stopped_early = stopped_before_first_step(guard, start_step, out)
        while not stopped_early and progress.step < tc.num_train_steps:
            # Ends once the previous step's flags are read (below): a step that never finishes
            # stops this iteration, and the watchdog ends the process.
            dog.start("train step", f"step {progress.step + 1}, waiting for the device")
            # image: [local_batch, H, W, C] -> [num_local, local_batch / num_local, H, W, C]
            batch = _shard(next(train_iter), keep, num_local)
            p_state, metrics = p_train_step(progress.p_state, batch)
            bar.update(1)
            progress = progress.after_step(p_state, metrics, first_step=start_step + 1)
            step = progress.step

            # Preemption: every process gets the same answer at the same step.
            stop = guard.should_stop(step)
            due = due_actions(actions, step, last=stop or step == tc.num_train_steps, stopping=stop)
            # Non-finite steps were skipped on the device; the host reads their flags one step
            # late and catches up before anything is written (diffjax.training.nonfinite).
            progress = progress.replace(flags=check_flags(progress.flags, keep=0 if due else 1))
            dog.finish()

            for action in due:
                progress = action.run(progress)

            if stop:
                finish_stop(guard, out, step, ckpt_dir)
                stopped_early = True
        manager.wait_until_finished()

    report_end(is_main, stopped_early, progress.last_saved, ckpt_dir)
    return TrainResult(
        state=jax.device_get(jax_utils.unreplicate(progress.p_state)),
        metrics=progress.metrics,
        workdir=str(workdir),
        stopped_early=stopped_early,
    )
