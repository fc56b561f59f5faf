"""The metrics of ``diffjax evaluate`` over a restored run: one function per metric.

Each metric function takes a :class:`MetricContext` (the run, its config, the
:class:`MetricOptions` and the watchdog) and returns the JSON-ready dict that the command line
records under ``metrics.<name>``. The context also caches what several metrics share: the
samples (every sample metric uses the same), the Inception network and its features (fid and is).
:func:`evaluate_metrics` runs a list of metrics in order and adds each one's ``time_s``.

A bad option or a dataset the run cannot use raises :class:`diffjax.errors.UsageError` with a
one-line message naming the flag (the command line prints it and exits with status 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from etils import epath

from diffjax.errors import UsageError

__all__ = [
    "CLASSIFIER_DATASETS",
    "DEFAULT_INCEPTION_SAMPLES",
    "HEADLINES",
    "METRICS",
    "METRIC_FNS",
    "MetricContext",
    "MetricOptions",
    "bpd_metric",
    "digits_fd_metric",
    "evaluate_metrics",
    "fid_metric",
    "inception_score_metric",
    "reference_stats",
    "sample_images",
]

METRICS = ("bpd", "fid", "is", "digits_fd")
CLASSIFIER_DATASETS = ("digits", "mnist")
DEFAULT_INCEPTION_SAMPLES = 50_000


@dataclasses.dataclass(frozen=True)
class MetricOptions:
    """How the metrics are computed (the ``diffjax evaluate`` flags of the same names).

    ``None`` means the run's config decides (``sampler``, ``steps``, ``eta``, ``order``,
    ``spacing``, ``guidance_scale``, ``split``, ``ref_split``), or: all examples
    (``max_examples``), 50,000 samples for fid/is and the reference size for digits_fd
    (``num_samples``), ``workdir/eval/ref_...npz`` (``ref_stats``).
    """

    workdir: str
    batch_size: int = 100
    seed: int = 0
    split: str | None = None
    max_examples: int | None = None
    num_samples: int | None = None
    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    order: int | None = None
    spacing: str | None = None
    guidance_scale: float | None = None
    clip_denoised: bool = True
    condition: str = "label"
    inception_weights: str | None = None
    ref_stats: str | None = None
    ref_split: str | None = None
    preprocessing: str = "tf1"
    is_splits: int = 10

    @classmethod
    def from_namespace(cls, namespace: Any) -> MetricOptions:
        """The options of an object with these attributes (e.g. parsed flags)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class MetricContext:
    """What the metric functions read, and what they share once computed.

    ``run``: a ``diffjax.run.Run`` (EMA parameters); ``config``: its config (possibly with
    ``data.data_dir`` replaced); ``watchdog``: a ``diffjax.training.watchdog.Watchdog``.
    """

    run: Any
    config: Any
    options: MetricOptions
    watchdog: Any
    # The base key of the samples; None: jax.random.key(options.seed) (the command line).
    key: Any = None
    # Filled in by the metrics:
    samples: Any = None  # uint8 [N, H, W, C]
    sampling: dict[str, Any] | None = None  # how the samples were made
    inception_vars: Any = None
    inception_fn: Callable[..., Any] | None = None
    weights: dict[str, str] | None = None  # path and sha256 of the Inception weights
    inception: tuple[Any, Any] | None = None  # (pool3 [N, 2048], logits [N, 1008])


def bpd_metric(ctx: MetricContext) -> dict[str, Any]:
    """Bits/dim over all T steps on ``options.split`` (Ho et al. 2020 eq. 5)."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from diffjax.data import pipeline as input_pipeline
    from diffjax.evaluation import bpd

    run, opts, config = ctx.run, ctx.options, ctx.config
    split = opts.split or config.data.eval_split
    use_labels = bool(run.num_classes) and opts.condition == "label"
    if use_labels and not config.data.num_classes:
        raise UsageError("--condition=label needs config.data.num_classes > 0")
    model = run.model
    null = run.num_classes

    def apply_fn(params: Any, x_t: Any, t: Any, y: Any) -> Any:
        if run.num_classes and y is None:  # the unconditional model of a CFG-trained network
            y = jnp.full((x_t.shape[0],), null, jnp.int32)
        return model.apply({"params": params}, x_t, t, y, train=False)

    d = config.diffusion
    step = bpd.make_bpd_step(
        apply_fn, run.schedule, mean_type=d.mean_type, var_type=d.var_type,
        clip_denoised=opts.clip_denoised,
    )  # fmt: skip
    batches = input_pipeline.create_eval_iterator(config, batch_size=opts.batch_size, split=split)
    total = input_pipeline.num_examples(config, split)
    if opts.max_examples is not None:
        total = min(total, opts.max_examples)
    devices = jax.local_devices()
    if opts.batch_size % len(devices):
        raise UsageError(
            f"--batch_size={opts.batch_size}: allowed for bpd: a multiple of the "
            f"{len(devices)} local devices"
        )
    bar = tqdm(total=total, desc=f"bpd ({run.schedule.num_timesteps} steps/batch)", file=sys.stderr)

    dog = ctx.watchdog

    def progress(i: int, seen: int) -> None:
        bar.update(seen - bar.n)
        dog.beat("bpd batch", f"bpd batch {i + 2}, after {seen} examples")

    dog.start("bpd batch", "bpd batch 1")
    try:
        result = bpd.evaluate_bpd(
            step, run.params, batches, jax.random.key(opts.seed), use_labels=use_labels,
            max_examples=opts.max_examples, progress=progress, devices=devices,
        )  # fmt: skip
    finally:
        dog.close()
    bar.close()
    result.update(
        split=split, seed=opts.seed, clip_denoised=opts.clip_denoised,
        condition=("label" if use_labels else "null") if run.num_classes else "none",
        num_timesteps=run.schedule.num_timesteps, estimator="exact sum over all T steps",
    )  # fmt: skip
    return result


def sample_images(ctx: MetricContext, num: int) -> Any:
    """``num`` uint8 samples [num, H, W, C] (cached in ctx: every sample metric uses the same)."""
    if ctx.samples is not None and ctx.samples.shape[0] >= num:
        return ctx.samples[:num]
    import jax
    import numpy as np
    from tqdm import tqdm

    from diffjax.data import images
    from diffjax.run import resolve_sampling_options

    run, opts = ctx.run, ctx.options
    try:
        sampler, options = resolve_sampling_options(
            run.config, sampler=opts.sampler, steps=opts.steps, eta=opts.eta, order=opts.order,
            spacing=opts.spacing,
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    devices = jax.local_devices()
    per_call = math.ceil(opts.batch_size / len(devices)) * len(devices)
    chunks = math.ceil(num / per_call)
    labels = None
    if run.num_classes:
        labels = (np.arange(chunks * per_call) % run.num_classes).astype(np.int32)
    elif opts.guidance_scale:
        raise UsageError(f"--guidance_scale={opts.guidance_scale}: the model is unconditional")
    guidance = opts.guidance_scale
    if guidance is None:  # Run.sample's default: config.sampling.guidance_scale
        section = run.config.get("sampling", None) or {}
        guidance = float(section.get("guidance_scale", 0.0)) if run.num_classes else 0.0
    key = jax.random.key(opts.seed) if ctx.key is None else ctx.key
    out = []
    for c in tqdm(range(chunks), desc=f"sampling ({sampler})", unit="batch", file=sys.stderr):
        with ctx.watchdog.watch("sampling batch", f"batch {c + 1} of {chunks}"):
            x = run.sample(
                jax.random.fold_in(key, c), per_call, sampler=sampler, steps=opts.steps,
                eta=opts.eta, order=opts.order, spacing=opts.spacing,
                y=None if labels is None else labels[c * per_call : (c + 1) * per_call],
                guidance_scale=guidance, devices=devices,
            )  # fmt: skip
            out.append(images.to_uint8(x))
    ctx.samples = np.concatenate(out)[:num]
    steps = options.get(
        "num_steps", len(options.get("timesteps", ())) or run.schedule.num_timesteps
    )
    ctx.sampling = dict(
        sampler=sampler, steps=int(steps), eta=options.get("eta"), order=options.get("order"),
        spacing=options.get("spacing"),
        clip_denoised=options["clip_denoised"], seed=opts.seed, params="ema",
        guidance_scale=guidance, labels="classes cycled" if labels is not None else "none",
    )  # fmt: skip
    return ctx.samples


def _inception_network(ctx: MetricContext) -> None:
    """Load the Inception weights and make the feature function (once)."""
    if ctx.inception_vars is not None:
        return
    from diffjax.evaluation import inception

    opts = ctx.options
    try:
        variables = inception.load_inception_variables(opts.inception_weights)
    except ValueError as e:
        raise UsageError(f"--inception_weights={opts.inception_weights}: {e}") from None
    ctx.inception_vars = variables
    ctx.inception_fn = inception.make_inception_fn(opts.preprocessing)
    digest = hashlib.sha256(epath.Path(opts.inception_weights).read_bytes()).hexdigest()
    ctx.weights = dict(path=str(opts.inception_weights), sha256=digest)


def _inception_features(ctx: MetricContext) -> tuple[Any, Any]:
    """(pool3 [N, 2048], logits [N, 1008]) of the samples, computed once for fid and is."""
    if ctx.inception is None:
        from diffjax.evaluation import inception

        _inception_network(ctx)
        opts = ctx.options
        images = sample_images(ctx, opts.num_samples or DEFAULT_INCEPTION_SAMPLES)
        ctx.inception = inception.compute_inception_features(
            ctx.inception_fn, ctx.inception_vars, images, batch_size=opts.batch_size
        )
    return ctx.inception


def reference_stats(ctx: MetricContext) -> tuple[Any, str, bool]:
    """Reference statistics: ``ref_stats`` if it exists, else computed from ``ref_split`` and saved.

    Returns (statistics, path, whether an existing file was reused).
    """
    from diffjax.data import pipeline as input_pipeline
    from diffjax.evaluation import fid, inception

    opts, config = ctx.options, ctx.config
    split = opts.ref_split or config.data.train_split
    # The name holds what the statistics depend on: a cached file is not reused for another
    # dataset, image size, split, example count or preprocessing.
    size = "all" if opts.max_examples is None else opts.max_examples
    default = (
        f"ref_{config.data.name}{config.data.image_size}_{split}{size}_{opts.preprocessing}.npz"
    )
    path = epath.Path(opts.ref_stats or epath.Path(opts.workdir) / "eval" / default)
    if path.exists():
        try:
            stats = fid.load_statistics(path)
        except ValueError as e:
            raise UsageError(str(e)) from None
        made_with = stats.meta.get("preprocessing", opts.preprocessing)
        if made_with != opts.preprocessing:
            raise UsageError(
                f"--ref_stats={path} was made with preprocessing {made_with!r}, not "
                f"--preprocessing={opts.preprocessing}: the features are not comparable"
            )
        return stats, str(path), True
    real, _ = input_pipeline.load_split_as_array(config, split, opts.max_examples)
    pool, _ = inception.compute_inception_features(
        ctx.inception_fn, ctx.inception_vars, real, batch_size=opts.batch_size
    )
    meta = dict(dataset=config.data.name, split=split, preprocessing=opts.preprocessing,
                image_size=config.data.image_size, features="FID Inception pool3")  # fmt: skip
    stats = fid.compute_statistics(pool, meta=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fid.save_statistics(path, stats)
    return stats, str(path), False


def fid_metric(ctx: MetricContext) -> dict[str, Any]:
    """FID of the samples against the reference statistics (FID Inception pool3)."""
    from diffjax.evaluation import fid

    _inception_network(ctx)
    ref, path, reused = reference_stats(ctx)  # before sampling: a bad file fails fast
    pool, _ = _inception_features(ctx)
    value = fid.frechet_distance_stats(fid.compute_statistics(pool), ref)
    return dict(
        fid=value, num_samples=int(pool.shape[0]), sampling=ctx.sampling,
        reference=dict(path=path, num=ref.num, reused=reused, **ref.meta),
        preprocessing=ctx.options.preprocessing, weights=ctx.weights,
        network="FID Inception-v3 (inception-2015-12-05), pool3",
    )  # fmt: skip


def inception_score_metric(ctx: MetricContext) -> dict[str, Any]:
    """Inception Score of the samples (softmax over all 1008 logits)."""
    from diffjax.evaluation import fid

    _, logits = _inception_features(ctx)
    splits = min(ctx.options.is_splits, logits.shape[0])
    mean, std = fid.inception_score(logits, num_splits=splits)
    return dict(
        inception_score=mean, std=std, splits=splits, num_samples=int(logits.shape[0]),
        sampling=ctx.sampling, preprocessing=ctx.options.preprocessing,
        weights=ctx.weights, classes="softmax over all 1008 logits",
    )  # fmt: skip


def real_train_fd(
    train_images: Any, num: int, reference: Any, params: Any, cfg: Any, seed: int = 0
) -> float:
    """The Frechet distance that ``num`` real training images (drawn without replacement by
    ``seed``; all of them when there are fewer) score against ``reference`` in the classifier's
    features: the floor of digits_fd for a generator that had learnt the training distribution
    exactly, at the same sample count. On digits real images score about 10-12 against the 297
    test images, so a model near that is as good as the metric can tell."""
    import numpy as np

    from diffjax.evaluation import digits_classifier as dc
    from diffjax.evaluation import fid

    n = min(num, train_images.shape[0])
    idx = np.sort(np.random.default_rng(seed).choice(train_images.shape[0], n, replace=False))
    feats, _ = dc.classifier_outputs(params, train_images[idx], cfg)
    return float(fid.frechet_distance_stats(fid.compute_statistics(feats), reference))


def digits_fd_metric(ctx: MetricContext) -> dict[str, Any]:
    """Frechet distance in a small digits classifier's features, its IS analogue, and
    ``real_train_fd``: what as many real training digits score (:func:`real_train_fd`)."""
    from diffjax.data import pipeline as input_pipeline
    from diffjax.evaluation import digits_classifier as dc
    from diffjax.evaluation import fid

    opts, config = ctx.options, ctx.config
    if config.data.name not in CLASSIFIER_DATASETS:
        raise UsageError(
            f"digits_fd needs a grey labelled dataset; got {config.data.name!r}, "
            f"allowed: {', '.join(CLASSIFIER_DATASETS)}"
        )
    split = opts.split or config.data.eval_split
    train = input_pipeline.load_split_as_array(config, config.data.train_split)
    test = input_pipeline.load_split_as_array(config, split)
    cfg = dc.ClassifierConfig(num_classes=int(config.data.get("num_classes") or 10))
    cache = epath.Path(opts.workdir) / "eval" / f"classifier_{config.data.name}_{split}.npz"
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Accuracy on the whole split; --max_examples caps only the reference set of the FD.
    params, accuracy, cached = dc.get_classifier(train, test, cache_path=str(cache), cfg=cfg)
    real = test[0][: opts.max_examples]  # [N, H, W, C] uint8
    fake = sample_images(ctx, opts.num_samples or real.shape[0])
    real_feats, _ = dc.classifier_outputs(params, real, cfg)
    fake_feats, fake_logits = dc.classifier_outputs(params, fake, cfg)
    reference = fid.compute_statistics(real_feats)
    value = fid.frechet_distance_stats(fid.compute_statistics(fake_feats), reference)
    score, _ = fid.inception_score(fake_logits, num_splits=1)
    return dict(
        digits_fd=value, digits_is=score, num_samples=int(fake.shape[0]),
        real_train_fd=real_train_fd(train[0], int(fake.shape[0]), reference, params, cfg),
        reference=dict(split=split, num=int(real.shape[0])), sampling=ctx.sampling,
        classifier=dict(test_accuracy=accuracy, split=split, cache=str(cache), cached=cached,
                        features=f"penultimate layer ({cfg.hidden[-1]}-d)",
                        **dataclasses.asdict(cfg)),
        note="Frechet distance in a small digits classifier's features; not comparable to FID",
    )  # fmt: skip


METRIC_FNS: dict[str, Callable[[MetricContext], dict[str, Any]]] = {
    "bpd": bpd_metric,
    "fid": fid_metric,
    "is": inception_score_metric,
    "digits_fd": digits_fd_metric,
}

# The one number printed per metric.
HEADLINES = {
    "bpd": "total_bpd",
    "fid": "fid",
    "is": "inception_score",
    "digits_fd": "digits_fd",
}


def evaluate_metrics(ctx: MetricContext, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{name: result}`` of each metric in ``names``, in order, each with its ``time_s``.

    A ``FileNotFoundError`` or ``ValueError`` of the library (a dataset that is not prepared, a
    config the data does not fit, ...) becomes a UsageError ``NAME: MESSAGE``.
    """
    results = {}
    for name in names:
        start = time.time()
        try:
            results[name] = METRIC_FNS[name](ctx)
        except (FileNotFoundError, ValueError) as e:
            # The library raises these with one-line messages that name the bad value.
            raise UsageError(f"{name}: {e}") from None
        results[name]["time_s"] = round(time.time() - start, 2)
    return results
