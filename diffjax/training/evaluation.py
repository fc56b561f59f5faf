"""Evaluation during training: two periodic actions of the loop (``config.evaluation``).

* every ``eval_every_steps``: the fixed-noise eval loss of the parameters and the EMA on the
  first ``eval_examples`` of ``data.eval_split`` (``diffjax.training.eval_loss``), to
  TensorBoard as ``eval/loss`` and ``eval/ema_loss``;
* every ``quality_every_steps``: from the EMA parameters, bits/dim over the full bound (all T
  steps, Ho et al. 2020 eq. 5; ``diffjax.evaluation.bpd``) on the first ``bpd_examples`` of
  ``data.eval_split`` (``eval/bpd``), and the sample metric of ``sample_metric``
  (``diffjax.evaluation.run_metrics``): ``digits_fd`` / ``digits_is`` on digits and MNIST, or
  ``fid`` / ``is`` with the configured Inception weights and reference statistics, from
  ``num_samples`` samples of ``sampler`` with ``num_steps`` steps; the sample grid goes to
  TensorBoard as ``eval/samples``.

Both also run after the last step (not on a stop: a preemption notice leaves seconds), and both
merge their results into ``workdir/eval/step_<step>.json`` in the record format of
``diffjax evaluate`` (``diffjax.evaluation.records``), with how each number was made.

Evaluation never changes the training stream: it reads the replicated state without donating
it, and its keys are ``fold_in(key(training.seed), EVAL_STREAM)`` (loss, bits/dim and samples
each fold in their own id), so a run gives bitwise the same parameters with evaluation on or off.
A stop request (SIGTERM, SIGINT) that arrives during an evaluation of a single-process run ends
it at the next batch, unrecorded; the loop then stops after its next step as usual.

Multi-host: every process evaluates its share (its slice of each eval batch, its share of the
samples with its own key); the shares are combined with all-gathers, and process 0 computes the
sample metric and writes the record and TensorBoard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import jax_utils

from diffjax.core.schedules import Schedule
from diffjax.data import images
from diffjax.errors import ReportableError
from diffjax.evaluation import bpd, records, run_metrics
from diffjax.run import Run
from diffjax.training.actions import Outputs
from diffjax.training.bookkeeping import Progress
from diffjax.training.eval_loss import FixedSubset, evaluate_loss, make_p_eval_loss
from diffjax.training.periodic import PeriodicAction
from diffjax.training.throughput import Throughput

__all__ = [
    "EVAL_STREAM",
    "EvaluationError",
    "EvaluationInterrupted",
    "Evaluator",
    "make_evaluation_actions",
    "make_evaluator",
    "sample_metrics",
]

# The key stream of evaluation, beside the loop's 0 (init), 1 (steps) and 2 (sample grids).
EVAL_STREAM = 3
# Sub-streams of the evaluation key.
_LOSS_STREAM, _BPD_STREAM, _SAMPLES_STREAM = 0, 1, 2
_GRID_IMAGES = 64  # samples in the TensorBoard grid
_BPD_SCALARS = ("total_bpd", "prior_bpd", "decoder_bpd")  # the others are [T] curves


class EvaluationError(ReportableError):
    """A file that evaluation needs is missing (raised before the first step)."""


class EvaluationInterrupted(Exception):
    """A stop request arrived while an evaluation ran."""


def sample_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The metric names of ``evaluation.sample_metric`` for this dataset ("auto": digits_fd on
    digits/MNIST, else fid and is where both Inception files are given, else none)."""
    ev, name = config.evaluation, config.data.name
    choice = ev.sample_metric
    if choice == "auto":
        if name in run_metrics.CLASSIFIER_DATASETS:
            choice = "digits_fd"
        else:
            choice = "fid" if ev.inception_weights and ev.ref_stats else "none"
    return {"digits_fd": ("digits_fd",), "fid": ("fid", "is"), "none": ()}[choice]


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """What the two actions need, built once per run by :func:`make_evaluator`.

    ``key``: the evaluation key ``fold_in(key(seed), EVAL_STREAM)``; ``loss_subset`` /
    ``bpd_subset``: the fixed subsets (None: that evaluation is off); ``p_eval_loss``: the
    pmapped eval loss; ``bpd_step``: the jitted bound of one batch (compiled once per run);
    ``metrics``: the sample metrics; ``stop_requested``: whether a stop request arrived.
    """

    config: ml_collections.ConfigDict
    workdir: epath.Path
    model: Any
    schedule: Schedule
    key: jax.Array
    loss_subset: FixedSubset | None
    bpd_subset: FixedSubset | None
    p_eval_loss: Callable[..., jax.Array] | None
    bpd_step: Callable[..., dict[str, jax.Array]] | None
    metrics: tuple[str, ...]
    stop_requested: Callable[[], bool]


def make_evaluator(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    model: Any,
    schedule: Schedule,
    key: jax.Array,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Evaluator:
    """Load the fixed subsets and build the evaluation functions of ``config.evaluation``.

    :raises EvaluationError: FID/IS without the Inception weights or reference statistics file.
    """
    ev, split = config.evaluation, config.data.eval_split
    shards = jax.process_count() * jax.local_device_count()
    quality = ev.quality_every_steps > 0
    metrics = sample_metrics(config) if quality else ()
    for name in ("inception_weights", "ref_stats") if "fid" in metrics else ():
        if not epath.Path(ev[name]).exists():
            raise EvaluationError(f"evaluation.{name} = {ev[name]!r}: no such file")
    loss_subset = bpd_subset = p_eval_loss = bpd_step = None
    if ev.eval_every_steps > 0:
        loss_subset = FixedSubset.load(config, split, ev.eval_examples, ev.batch_size, shards)
        p_eval_loss = make_p_eval_loss(
            config, model, schedule, jax.random.fold_in(key, _LOSS_STREAM)
        )
    if quality and ev.bpd_examples > 0:
        bpd_subset = FixedSubset.load(config, split, ev.bpd_examples, ev.batch_size, shards)
        bpd_step = bpd.make_bpd_step(functools.partial(_apply, model), schedule,
                                     mean_type=config.diffusion.mean_type,
                                     var_type=config.diffusion.var_type)  # fmt: skip
    return Evaluator(config, workdir, model, schedule, key, loss_subset, bpd_subset, p_eval_loss,
                     bpd_step, metrics, stop_requested)  # fmt: skip


def _apply(model: Any, params: Any, x_t: jax.Array, t: jax.Array, y: Any) -> jax.Array:
    """The EMA network as bits/dim calls it; a conditional model without labels: the null class."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes and y is None:
        y = jnp.full((x_t.shape[0],), num_classes, jnp.int32)
    return model.apply({"params": params}, x_t, t, y, train=False)


class _StopAware:
    """The run's watchdog, that also raises EvaluationInterrupted when a call of a single-process
    run starts after a stop request (several processes must finish their collectives)."""

    def __init__(self, dog: Any, stop_requested: Callable[[], bool]) -> None:
        self._dog, self._stop = dog, stop_requested
        self._single = jax.process_count() == 1

    def check(self) -> None:
        """Raise EvaluationInterrupted after a stop request (single-process runs)."""
        if self._single and self._stop():
            raise EvaluationInterrupted

    def start(self, kind: str, what: str) -> None:
        self.check()
        self._dog.start(kind, what)

    def beat(self, kind: str, what: str) -> None:
        self._dog.finish()
        self.start(kind, what)

    def finish(self) -> None:
        self._dog.finish()

    def close(self) -> None:
        self._dog.close()

    @contextlib.contextmanager
    def watch(self, kind: str, what: str) -> Iterator[None]:
        self.check()
        with self._dog.watch(kind, what):
            yield


def _gather(x: np.ndarray) -> np.ndarray:
    """``x`` of every process, concatenated along axis 0 (this process's own with one)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- the eval loss ----------------------------------------------------------------------------


def run_eval_loss(ev: Evaluator, out: Outputs, progress: Progress) -> Progress:
    """The fixed-noise eval loss of the parameters and the EMA (TensorBoard, console, record)."""
    step, dog, start = progress.step, _StopAware(out.watchdog, ev.stop_requested), time.time()
    p_state, subset = progress.p_state, ev.loss_subset
    try:
        with dog.watch("eval loss", f"eval loss of step {step}"):
            result = evaluate_loss(
                ev.p_eval_loss, p_state.params, p_state.ema_params, subset,
                process_index=jax.process_index(), process_count=jax.process_count(),
                num_local=jax.local_device_count(), before_batch=lambda i: dog.check(),
            )  # fmt: skip
    except EvaluationInterrupted:
        out.say(f"step {step}: eval loss interrupted by a stop request; not recorded")
        return progress.replace(timer=Throughput.started())
    out.writer.write_scalars(step, {"eval/loss": result["loss"],
                                    "eval/ema_loss": result["ema_loss"]})  # fmt: skip
    out.say(f"step {step}: eval loss {result['loss']:.4f}, ema_loss {result['ema_loss']:.4f}")
    result.update(
        split=subset.split, examples=f"the first {subset.num} of {subset.split}",
        loss_type=ev.config.diffusion.loss_type, params="params (loss) and ema (ema_loss)",
        noise=f"t and noise of example j from fold_in(fold_in(fold_in(key(training.seed), "
        f"{EVAL_STREAM}), {_LOSS_STREAM}), j)", time_s=round(time.time() - start, 2),
    )  # fmt: skip
    _record(ev, out, step, {"eval_loss": result})
    return progress.replace(timer=Throughput.started())  # images/s: training only


def _record(ev: Evaluator, out: Outputs, step: int, results: dict[str, Any]) -> None:
    if out.is_main:
        path = records.record_path(ev.workdir, step)
        records.merge_record(path, step=step, workdir=str(ev.workdir), results=results)
    out.writer.flush()


# --- bits/dim and the sample metric -----------------------------------------------------------


def _combine_bpd(local: dict[str, Any] | None, num_timesteps: int) -> dict[str, Any]:
    """The example-weighted mean of every process's ``bpd.accumulate_bpd`` result (None: this
    process had no example of the subset)."""
    if jax.process_count() == 1:
        return local
    n = float(local["num_examples"]) if local else 0.0
    sizes = [1 if k in _BPD_SCALARS else num_timesteps for k in bpd.BPD_KEYS]
    parts = [n * np.atleast_1d(np.asarray(local[k], np.float64)) if local else np.zeros(size)
             for k, size in zip(bpd.BPD_KEYS, sizes, strict=True)]  # fmt: skip
    rows = _gather(np.concatenate([[n], *parts])[None])  # [P, 1 + 3 + 3 T]
    total = rows[:, 0].sum()
    mean = rows[:, 1:].sum(axis=0) / total
    out: dict[str, Any] = {"num_examples": int(total)}
    for k, end, size in zip(bpd.BPD_KEYS, np.cumsum(sizes), sizes, strict=True):
        out[k] = float(mean[end - 1]) if size == 1 else mean[end - size : end].tolist()
    return out


def _bits_per_dim(ev: Evaluator, ema: Any, dog: _StopAware) -> dict[str, Any]:
    """Bits/dim over all T steps on the bpd subset (``evaluation.bpd_examples``), EMA params."""
    subset, p = ev.bpd_subset, jax.process_index()
    batches = list(subset.process_batches(p, jax.process_count()))
    use_labels = bool(int(ev.config.model.num_classes or 0))
    key = jax.random.fold_in(jax.random.fold_in(ev.key, _BPD_STREAM), p)
    local = None
    if any(b["mask"].any() for b in batches):
        dog.start("bpd batch", f"bpd batch 1 of {len(batches)}")
        try:
            local = bpd.evaluate_bpd(
                ev.bpd_step, ema, batches, key, use_labels=use_labels,
                progress=lambda i, seen: dog.beat("bpd batch", f"bpd batch {i + 2}"),
                devices=jax.local_devices(),
            )  # fmt: skip
        finally:
            dog.close()
    result = _combine_bpd(local, ev.schedule.num_timesteps)
    result.update(
        split=subset.split, examples=f"the first {subset.num} of {subset.split}",
        seed=int(ev.config.training.seed), clip_denoised=True,
        condition="label" if use_labels else "none",
        num_timesteps=ev.schedule.num_timesteps, estimator="exact sum over all T steps",
        noise=f"batch i, step t: fold_in(fold_in(fold_in(fold_in(key(training.seed), "
        f"{EVAL_STREAM}), {_BPD_STREAM}), process), i), t)",
    )  # fmt: skip
    return result


def _sample_metric_results(
    ev: Evaluator, ema: Any, step: int, dog: _StopAware
) -> tuple[dict[str, Any], np.ndarray]:
    """(results of the sample metrics, uint8 samples [N, H, W, C]) from the EMA parameters."""
    ec, p, count = ev.config.evaluation, jax.process_index(), jax.process_count()
    options = run_metrics.MetricOptions(
        workdir=str(ev.workdir), batch_size=max(1, ec.batch_size // count),
        seed=int(ev.config.training.seed), num_samples=ec.num_samples, sampler=ec.sampler,
        steps=ec.num_steps, inception_weights=ec.inception_weights, ref_stats=ec.ref_stats,
    )  # fmt: skip
    key = jax.random.fold_in(jax.random.fold_in(ev.key, _SAMPLES_STREAM), p)
    run = Run(config=ev.config, schedule=ev.schedule, model=ev.model, params=ema, step=step)
    ctx = run_metrics.MetricContext(run=run, config=ev.config, options=options, watchdog=dog,
                                    key=key)  # fmt: skip
    start = time.time()
    share = -(-ec.num_samples // count)
    ctx.samples = _gather(run_metrics.sample_images(ctx, share))[: ec.num_samples]
    ctx.sampling.update(
        num_processes=count, key=f"process p: fold_in(fold_in(fold_in(key(training.seed), "
        f"{EVAL_STREAM}), {_SAMPLES_STREAM}), p), chunk c: fold_in(that, c)",
    )  # fmt: skip
    sampling_s = round(time.time() - start, 2)
    if p != 0:  # process 0 computes the metrics of all samples
        return {}, ctx.samples
    with dog.watch("sample metric", f"{', '.join(ev.metrics)} of step {step}"):
        results = run_metrics.evaluate_metrics(ctx, ev.metrics)
    for entry in results.values():
        entry["sampling_time_s"] = sampling_s
    return results, ctx.samples


_SCALARS = {"bpd": ("total_bpd", "bpd"), "digits_fd": ("digits_fd", "digits_fd"),
            "fid": ("fid", "fid"), "is": ("inception_score", "is")}  # fmt: skip


def run_quality(ev: Evaluator, out: Outputs, progress: Progress) -> Progress:
    """Bits/dim and the sample metric of the EMA parameters (TensorBoard, console, record)."""
    step, dog, start = progress.step, _StopAware(out.watchdog, ev.stop_requested), time.time()
    ema = jax.device_get(jax_utils.unreplicate(progress.p_state.ema_params))  # host copy
    results: dict[str, Any] = {}
    samples = None
    try:
        if ev.bpd_subset is not None:
            t0 = time.time()
            results["bpd"] = _bits_per_dim(ev, ema, dog)
            results["bpd"]["time_s"] = round(time.time() - t0, 2)
        if ev.metrics:
            metric_results, samples = _sample_metric_results(ev, ema, step, dog)
            results.update(metric_results)
    except EvaluationInterrupted:
        out.say(f"step {step}: evaluation interrupted by a stop request; not recorded")
        return progress.replace(timer=Throughput.started())
    scalars = {f"eval/{tag}": results[m][k] for m, (k, tag) in _SCALARS.items() if m in results}
    if "digits_fd" in results:
        scalars["eval/digits_is"] = results["digits_fd"]["digits_is"]
        scalars["eval/digits_fd_real"] = results["digits_fd"]["real_train_fd"]
    out.writer.write_scalars(step, scalars)
    if samples is not None:
        out.writer.write_image(step, "eval/samples", images.make_grid(samples[:_GRID_IMAGES]))
    summary = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in scalars.items())
    out.say(f"step {step}: {summary or 'evaluated'} in {time.time() - start:.1f} s")
    _record(ev, out, step, results)
    return progress.replace(timer=Throughput.started())  # images/s: training only


def make_evaluation_actions(out: Outputs, ev: Evaluator) -> tuple[PeriodicAction[Progress], ...]:
    """The eval loss and the quality metrics as periodic actions (none when both are off);
    neither runs on a stop."""
    ec, actions = out.config.evaluation, []
    if ev.loss_subset is not None:
        actions.append(
            PeriodicAction(
                "eval loss",
                ec.eval_every_steps,
                functools.partial(run_eval_loss, ev, out),
                on_stop=False,
            )
        )
    if ev.bpd_subset is not None or ev.metrics:
        actions.append(
            PeriodicAction(
                "quality",
                ec.quality_every_steps,
                functools.partial(run_quality, ev, out),
                on_stop=False,
            )
        )
    return tuple(actions)
