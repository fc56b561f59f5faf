"""The training loop: ``train_and_evaluate(config, workdir)``, from one CPU to a TPU pod.

What a run does (see ``train.py`` for the command line; usable from a notebook as well)::

    from diffjax import training
    from configs import digits
    result = training.train_and_evaluate(digits.get_config(), "workdirs/digits")

1. validates the config for this topology (global batch divisible by all devices);
2. writes ``workdir/config.json`` and TensorBoard events (process 0 only);
3. builds the U-Net, the schedule and the optimizer, and resumes from the latest checkpoint
   in ``workdir/checkpoints`` when there is one: parameters, EMA, Adam moments and the step,
   which is also the position in the data stream (batch k is a pure function of
   (seed, k, process), see ``diffjax.input_pipeline``) and in the key stream;
4. runs the data-parallel step (``diffjax.train_step``) on all local devices, logging loss,
   gradient norm, learning rate and images/s every ``log_every_steps``, saving a checkpoint
   every ``checkpoint_every_steps`` and a PNG grid of samples from the EMA parameters every
   ``sample_every_steps`` (and all three at the end);
5. stops early, with a checkpoint, on SIGTERM/SIGINT (``diffjax.preemption``).

Multi-host. Every process runs the same program on its local devices; the global batch is
split evenly over processes and their devices. Call :func:`initialize_distributed` first
(``train.py`` does): it calls ``jax.distributed.initialize()`` only when the environment
describes several processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
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

from diffjax import checkpointing, images, input_pipeline, sampling
from diffjax.config_validation import validate_config
from diffjax.metrics_writer import MetricWriter, format_metrics
from diffjax.models import create_model
from diffjax.preemption import StopGuard
from diffjax.run import resolve_sampling_options
from diffjax.schedules import Schedule, make_schedule
from diffjax.train_state import TrainState, create_train_state
from diffjax.train_step import AXIS_NAME, make_p_train_step, per_device_batch_size

__all__ = [
    "TrainResult",
    "initialize_distributed",
    "make_sample_fn",
    "multiprocess_requested",
    "train_and_evaluate",
]

# Independent key streams derived from training.seed.
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


# --- multi-host start-up ----------------------------------------------------------------------


def multiprocess_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment describes a run of several processes.

    ``DIFFJAX_DISTRIBUTED=1`` / ``0`` decides explicitly. Otherwise any of: an explicit
    coordinator (``JAX_COORDINATOR_ADDRESS``), a multislice TPU job
    (``MEGASCALE_COORDINATOR_ADDRESS``), several TPU workers (``TPU_WORKER_HOSTNAMES`` or
    ``TPU_PROCESS_ADDRESSES`` with more than one entry, as on GKE), or a Slurm / Open MPI job
    of several tasks (``SLURM_NTASKS``, ``OMPI_COMM_WORLD_SIZE`` > 1).
    """
    env = os.environ if env is None else env
    explicit = env.get("DIFFJAX_DISTRIBUTED")
    if explicit is not None:
        return explicit.strip().lower() in ("1", "true", "yes")
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if any("," in env.get(k, "") for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")):
        return True
    return any(int(env.get(k, "1") or "1") > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """``jax.distributed.initialize()`` when :func:`multiprocess_requested`; else nothing.

    Must run before any JAX computation. On Cloud TPU, Slurm and Open MPI the coordinator,
    process count and id are detected by JAX; elsewhere set ``JAX_COORDINATOR_ADDRESS``
    (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
    Returns whether it initialized.
    """
    env = os.environ if env is None else env
    if not multiprocess_requested(env):
        return False
    kwargs: dict[str, Any] = {}
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True


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

    @jax.jit
    def sample_fn(params: Any, rng: jax.Array) -> jax.Array:
        model_fn = sampling.make_model_fn(model, params, guidance_scale=guidance)
        return sampling.sample_pmapped(
            model_fn,
            schedule,
            rng,
            shape,
            sampler=sampler,
            devices=devices,
            model_kwargs={} if labels is None else {"y": labels},
            **options,
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


# --- the loop ---------------------------------------------------------------------------------


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | epath.PathLike
) -> TrainResult:
    """Train (or resume training) the run in ``workdir`` up to ``training.num_train_steps``.

    :raises diffjax.config_validation.ConfigError: the config is invalid for this topology.
    :raises diffjax.input_pipeline.DatasetNotPreparedError: the dataset needs ``tfds build``.
    """
    num_local = jax.local_device_count()
    validate_config(config, num_devices=num_local, num_processes=jax.process_count())
    per_device_batch_size(config.training.batch_size, jax.process_count(), num_local)
    # Fail fast, before writing or compiling anything, when the dataset is not prepared.
    input_pipeline.num_examples(config, config.data.train_split)
    tc = config.training
    workdir = checkpointing.resolve_workdir(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        checkpointing.save_config(workdir, config)
        print(f"workdir: {workdir}")

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
    # Closed in reverse order on any exit; the manager's close waits for pending saves.
    with contextlib.ExitStack() as stack:
        writer = MetricWriter(workdir, enabled=is_main)
        stack.callback(writer.close)
        manager = stack.enter_context(
            checkpointing.create_checkpoint_manager(workdir, keep=tc.keep_checkpoints)
        )
        state = _restore_or_init(config, model, manager, init_key)
        start_step = last_saved = step = int(state.step)
        if start_step and is_main:
            print(f"resuming from the checkpoint at step {start_step}")
        num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        logging.info("model: %d parameters; %d local device(s)", num_params, num_local)
        # Replicated along the mesh axis of the step, so that the second call does not recompile.
        p_state = jax_utils.replicate(state, axis_name=AXIS_NAME)
        del state  # the replicated copy is donated at every step
        train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
        guard = stack.enter_context(StopGuard())
        bar = stack.enter_context(
            tqdm(total=tc.num_train_steps, initial=start_step, disable=not is_main, desc="train")
        )
        timer_start, timer_steps = time.perf_counter(), 0
        while step < tc.num_train_steps:
            batch = next(train_iter)
            batch = _shard({k: batch[k] for k in keep}, num_local)
            p_state, metrics = p_train_step(p_state, batch)
            step += 1
            history.append(metrics)
            bar.update(1)
            if step == start_step + 1:
                # Throughput excludes the first step, which compiles.
                jax.block_until_ready(metrics)
                timer_start, timer_steps = time.perf_counter(), 0
            else:
                timer_steps += 1

            # Preemption: every process gets the same answer at the same step (diffjax.preemption).
            stop = guard.should_stop(step)
            final = step == tc.num_train_steps or stop

            if step % tc.log_every_steps == 0 or final:
                last_metrics = _mean_metrics(history)
                history.clear()
                elapsed = time.perf_counter() - timer_start
                if timer_steps and elapsed > 0:
                    last_metrics["images_per_sec"] = timer_steps * tc.batch_size / elapsed
                timer_start, timer_steps = time.perf_counter(), 0
                writer.write_scalars(step, last_metrics)
                bar.set_postfix(loss=f"{last_metrics['loss']:.4f}")
                if is_main:
                    bar.write(format_metrics(step, last_metrics))

            if step % tc.checkpoint_every_steps == 0 or final:
                unrep = jax_utils.unreplicate(p_state)
                checkpointing.save_training_checkpoint(
                    manager,
                    step,
                    params=unrep.params,
                    ema_params=unrep.ema_params,
                    opt_state=unrep.opt_state,
                    meta=_meta(config, step),
                )
                last_saved = step

            if is_main and (step % tc.sample_every_steps == 0 or final):
                # Host copy: the sampler places it on its own devices.
                ema = jax.device_get(jax_utils.unreplicate(p_state.ema_params))
                path = _write_samples(sample_fn, ema, sample_key, step, workdir, writer)
                bar.write(f"step {step}: samples in {path}")
                writer.flush()
                timer_start, timer_steps = time.perf_counter(), 0  # images/s: training only

            if stop:
                stopped_early = True
                if is_main:
                    bar.write(f"stopped by {guard.reason} at step {step}; checkpoint saved")
                break
        manager.wait_until_finished()

    if is_main and last_saved:
        print(f"checkpoint: {checkpointing.checkpoint_dir(workdir) / str(last_saved)}")
    return TrainResult(
        state=jax.device_get(jax_utils.unreplicate(p_state)),
        metrics=last_metrics,
        workdir=str(workdir),
        stopped_early=stopped_early,
    )
