"""Evaluate a trained run: bits/dim, FID, Inception Score, and the digits classifier FD.

Usage::

    python -m diffjax.evaluate --workdir=RUN [--metrics=bpd,fid,is,digits_fd] [--step=STEP]
        [--num_samples=N] [--sampler=ddim] [--steps=100] [--eta=0.0] [--order=2]
        [--spacing=logsnr] [--guidance_scale=W]
        [--split=test] [--max_examples=N] [--batch_size=100] [--seed=0]
        [--inception_weights=inception_fid.npz] [--ref_stats=cifar10_train.npz]
        [--ref_split=train] [--preprocessing=tf1] [--is_splits=10]
        [--clip_denoised=true] [--condition=label] [--data_dir=DIR] [--out=FILE.json]
        [--watchdog_factor=20] [--watchdog_min_seconds=120] [--watchdog_first_seconds=0]

Metrics (default: ``bpd,digits_fd`` for digits/MNIST, ``bpd,fid,is`` otherwise):

- ``bpd``: negative log-likelihood bound in bits/dim over all T steps on ``--split`` (default
  ``config.data.eval_split``), Ho et al. 2020 eq. 5 (the official ``calc_bpd_loop``); reports the
  total, the prior term L_T, the decoder term L_0 and the per-step terms and MSEs.
- ``fid`` / ``is``: FID and Inception Score of ``--num_samples`` samples (default 50,000) with
  the FID Inception network (weights converted locally, see
  ``scripts/convert_inception_weights.py``). The reference statistics are ``--ref_stats``: read
  if the file exists, else computed from ``--ref_split`` (default ``config.data.train_split``)
  and written there (default path ``RUN/eval/ref_<dataset>_<split>_<preprocessing>.npz``).
- ``digits_fd``: Frechet distance in the features of a small classifier trained on the real
  train split (cached in ``RUN/eval/``), against the real ``--split``, with its Inception-Score
  analogue and test accuracy; for digits and MNIST only. Not comparable to FID.

Samples come from the EMA parameters, ``--batch_size`` per compiled call, chunk c with key
``fold_in(key(seed), c)``; a class-conditional model cycles through the classes. Results are
printed and merged into ``RUN/eval/step_<step>.json`` (or ``--out``) with how they were made.
A bpd or sampling batch that takes longer than max(``--watchdog_factor`` x its median,
``--watchdog_min_seconds``) prints the Python stacks and exits with status 124
(``diffjax.training.watchdog``; the first batch of each compiles and is only watched with
``--watchdog_first_seconds`` > 0).
Bad flags, a missing run or a missing weights file print one line
``diffjax.evaluate: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from etils import epath

from diffjax import choices
from diffjax.cli import common as cli
from diffjax.kernels import cpu_runtime

__all__ = ["main", "parse_args"]

EXIT_USAGE = cli.EXIT_USAGE
UsageError = cli.UsageError
_PROG = "diffjax.evaluate"
METRICS = ("bpd", "fid", "is", "digits_fd")
# Repeated from their modules so that flags are checked before jax is imported.
_SAMPLERS = choices.SAMPLERS
_PREPROCESSING = ("tf1", "pytorch_fid")
_CONDITIONS = ("label", "null")
_CLASSIFIER_DATASETS = ("digits", "mnist")
_DEFAULT_INCEPTION_SAMPLES = 50_000
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _fail(message: str) -> NoReturn:
    cli.fail(_PROG, message)


def _parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(_PROG, description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--workdir", required=True, help="run directory (local path or gs://)")
    add("--metrics", default=None, help=f"comma-separated subset of {','.join(METRICS)}")
    add("--step", type=int, default=None, help="checkpoint step (default: latest)")
    add("--num_samples", type=int, default=None, help="samples for fid/is/digits_fd")
    add("--sampler", default=None, help=f"one of {', '.join(_SAMPLERS)} (default: config)")
    add("--steps", type=int, default=None, help="sampling steps, 0 = all T (default: config)")
    add("--eta", type=float, default=None, help="DDIM eta (default: config)")
    add("--order", type=int, default=None, help="dpm++ order: 1, 2 or 3 (default: config)")
    add("--spacing", default=None, help=f"dpm++ levels: {', '.join(choices.DPM_SPACINGS)}")
    add("--guidance_scale", type=float, default=None, help="classifier-free guidance w")
    add("--split", default=None, help="split for bpd and the digits_fd reference")
    add("--max_examples", type=int, default=None, help="cap on real examples read per split")
    add("--batch_size", type=int, default=100, help="examples per compiled call")
    add("--seed", type=int, default=0, help="seed of the bpd noise and the samples")
    add("--inception_weights", default=None, help="FID Inception .npz (for fid and is)")
    add("--ref_stats", default=None, help="reference statistics .npz (read, or written)")
    add("--ref_split", default=None, help="split for the reference statistics")
    add("--preprocessing", default="tf1", help=f"one of {', '.join(_PREPROCESSING)}")
    add("--is_splits", type=int, default=10, help="Inception Score splits")
    add("--clip_denoised", default="true", help="bpd: clip the x_0 estimate (true/false)")
    add("--condition", default="label", help="bpd of a conditional model: label or null")
    add("--data_dir", default=None, help="override config.data.data_dir")
    add("--out", default=None, help="JSON file (default: RUN/eval/step_<step>.json)")
    cli.add_watchdog_flags(p)
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the flags that need no run; raises UsageError naming the bad value."""
    args = _parser().parse_args(argv)
    metrics = None if args.metrics is None else list(dict.fromkeys(args.metrics.split(",")))
    checks = [
        (
            "metrics",
            args.metrics,
            metrics is None or all(m in METRICS for m in metrics),
            f"a comma-separated subset of {','.join(METRICS)}",
        ),
        ("num_samples", args.num_samples, args.num_samples is None or args.num_samples >= 2,
         "an integer >= 2"),
        ("sampler", args.sampler, args.sampler in (None, *_SAMPLERS), ", ".join(_SAMPLERS)),
        ("steps", args.steps, args.steps is None or args.steps >= 0, "an integer >= 0"),
        ("eta", args.eta, args.eta is None or args.eta >= 0, "a number >= 0"),
        ("order", args.order, args.order in (None, *choices.DPM_ORDERS), "1, 2 or 3"),
        ("spacing", args.spacing, args.spacing in (None, *choices.DPM_SPACINGS),
         ", ".join(choices.DPM_SPACINGS)),
        ("guidance_scale", args.guidance_scale,
         args.guidance_scale is None or args.guidance_scale >= 0, "a number >= 0"),
        ("max_examples", args.max_examples, args.max_examples is None or args.max_examples >= 2,
         "an integer >= 2"),
        ("batch_size", args.batch_size, args.batch_size >= 1, "an integer >= 1"),
        ("step", args.step, args.step is None or args.step >= 0, "an integer >= 0"),
        ("preprocessing", args.preprocessing, args.preprocessing in _PREPROCESSING,
         ", ".join(_PREPROCESSING)),
        ("is_splits", args.is_splits, args.is_splits >= 1, "an integer >= 1"),
        ("clip_denoised", args.clip_denoised, args.clip_denoised.lower() in _BOOLS,
         "true or false"),
        ("condition", args.condition, args.condition in _CONDITIONS, ", ".join(_CONDITIONS)),
        ("out", args.out, args.out is None or args.out.endswith(".json"), "a path ending in .json"),
    ]  # fmt: skip
    for name, value, ok, allowed in checks:
        if not ok:
            raise UsageError(f"--{name}={value}: allowed: {allowed}")
    args.metrics = metrics
    args.clip_denoised = _BOOLS[args.clip_denoised.lower()]
    args.watchdog = cli.watchdog_settings(args)
    return args


def _check_files(args: argparse.Namespace) -> None:
    """Fail before importing jax when the run or a required file is missing."""
    cli.check_run_dir(args.workdir)
    path = epath.Path(args.workdir)
    if args.metrics is None:
        name = json.loads((path / "config.json").read_text())["data"]["name"]
        grey = name in _CLASSIFIER_DATASETS
        args.metrics = ["bpd", "digits_fd"] if grey else ["bpd", "fid", "is"]
    if {"fid", "is"} & set(args.metrics):
        if not args.inception_weights:
            raise UsageError(
                "fid and is need --inception_weights=FILE.npz (convert pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth with scripts/convert_inception_weights.py)"
            )
        if not epath.Path(args.inception_weights).exists():
            raise UsageError(f"--inception_weights={args.inception_weights}: no such file")


# ----------------------------------------------------------------------------- metrics


def _bpd(ctx: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from diffjax.data import pipeline as input_pipeline
    from diffjax.evaluation import bpd

    run, args, config = ctx["run"], ctx["args"], ctx["config"]
    split = args.split or config.data.eval_split
    use_labels = bool(run.num_classes) and args.condition == "label"
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
        clip_denoised=args.clip_denoised,
    )  # fmt: skip
    batches = input_pipeline.create_eval_iterator(config, batch_size=args.batch_size, split=split)
    total = input_pipeline.num_examples(config, split)
    if args.max_examples is not None:
        total = min(total, args.max_examples)
    devices = jax.local_devices()
    if args.batch_size % len(devices):
        raise UsageError(
            f"--batch_size={args.batch_size}: allowed for bpd: a multiple of the "
            f"{len(devices)} local devices"
        )
    bar = tqdm(total=total, desc=f"bpd ({run.schedule.num_timesteps} steps/batch)", file=sys.stderr)

    dog = ctx["watchdog"]

    def progress(i: int, seen: int) -> None:
        bar.update(seen - bar.n)
        dog.beat("bpd batch", f"bpd batch {i + 2}, after {seen} examples")

    dog.start("bpd batch", "bpd batch 1")
    try:
        result = bpd.evaluate_bpd(
            step, run.params, batches, jax.random.key(args.seed), use_labels=use_labels,
            max_examples=args.max_examples, progress=progress, devices=devices,
        )  # fmt: skip
    finally:
        dog.close()
    bar.close()
    result.update(
        split=split, seed=args.seed, clip_denoised=args.clip_denoised,
        condition=("label" if use_labels else "null") if run.num_classes else "none",
        num_timesteps=run.schedule.num_timesteps, estimator="exact sum over all T steps",
    )  # fmt: skip
    return result


def _samples(ctx: dict[str, Any], num: int) -> Any:
    """``num`` uint8 samples [num, H, W, C] (cached in ctx: every sample metric uses the same)."""
    if ctx.get("samples") is not None and ctx["samples"].shape[0] >= num:
        return ctx["samples"][:num]
    import jax
    import numpy as np
    from tqdm import tqdm

    from diffjax.data import images
    from diffjax.run import resolve_sampling_options

    run, args = ctx["run"], ctx["args"]
    try:
        sampler, options = resolve_sampling_options(
            run.config, sampler=args.sampler, steps=args.steps, eta=args.eta, order=args.order,
            spacing=args.spacing,
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    devices = jax.local_devices()
    per_call = math.ceil(args.batch_size / len(devices)) * len(devices)
    chunks = math.ceil(num / per_call)
    labels = None
    if run.num_classes:
        labels = (np.arange(chunks * per_call) % run.num_classes).astype(np.int32)
    elif args.guidance_scale:
        raise UsageError(f"--guidance_scale={args.guidance_scale}: the model is unconditional")
    guidance = args.guidance_scale
    if guidance is None:  # Run.sample's default: config.sampling.guidance_scale
        section = run.config.get("sampling", None) or {}
        guidance = float(section.get("guidance_scale", 0.0)) if run.num_classes else 0.0
    key = jax.random.key(args.seed)
    out = []
    for c in tqdm(range(chunks), desc=f"sampling ({sampler})", unit="batch", file=sys.stderr):
        with ctx["watchdog"].watch("sampling batch", f"batch {c + 1} of {chunks}"):
            x = run.sample(
                jax.random.fold_in(key, c), per_call, sampler=sampler, steps=args.steps,
                eta=args.eta, order=args.order, spacing=args.spacing,
                y=None if labels is None else labels[c * per_call : (c + 1) * per_call],
                guidance_scale=guidance, devices=devices,
            )  # fmt: skip
            out.append(images.to_uint8(x))
    ctx["samples"] = np.concatenate(out)[:num]
    steps = options.get(
        "num_steps", len(options.get("timesteps", ())) or run.schedule.num_timesteps
    )
    ctx["sampling"] = dict(
        sampler=sampler, steps=int(steps), eta=options.get("eta"), order=options.get("order"),
        spacing=options.get("spacing"),
        clip_denoised=options["clip_denoised"], seed=args.seed, params="ema",
        guidance_scale=guidance, labels="classes cycled" if labels is not None else "none",
    )  # fmt: skip
    return ctx["samples"]


def _inception_network(ctx: dict[str, Any]) -> None:
    """Load the Inception weights and make the feature function (once)."""
    if "inception_vars" in ctx:
        return
    from diffjax.evaluation import inception

    args = ctx["args"]
    try:
        ctx["inception_vars"] = inception.load_inception_variables(args.inception_weights)
    except ValueError as e:
        raise UsageError(f"--inception_weights={args.inception_weights}: {e}") from None
    ctx["inception_fn"] = inception.make_inception_fn(args.preprocessing)
    digest = hashlib.sha256(epath.Path(args.inception_weights).read_bytes()).hexdigest()
    ctx["weights"] = dict(path=str(args.inception_weights), sha256=digest)


def _inception_features(ctx: dict[str, Any]) -> tuple[Any, Any]:
    """(pool3 [N, 2048], logits [N, 1008]) of the samples, computed once for fid and is."""
    if "inception" not in ctx:
        from diffjax.evaluation import inception

        _inception_network(ctx)
        args = ctx["args"]
        samples = _samples(ctx, args.num_samples or _DEFAULT_INCEPTION_SAMPLES)
        ctx["inception"] = inception.compute_inception_features(
            ctx["inception_fn"], ctx["inception_vars"], samples, batch_size=args.batch_size
        )
    return ctx["inception"]


def _reference_stats(ctx: dict[str, Any]) -> tuple[Any, str, bool]:
    """Reference statistics: --ref_stats if it exists, else computed from --ref_split and saved."""
    from diffjax.data import pipeline as input_pipeline
    from diffjax.evaluation import fid, inception

    args, config = ctx["args"], ctx["config"]
    split = args.ref_split or config.data.train_split
    # The name holds what the statistics depend on: a cached file is not reused for another
    # dataset, image size, split, example count or preprocessing.
    size = "all" if args.max_examples is None else args.max_examples
    default = (
        f"ref_{config.data.name}{config.data.image_size}_{split}{size}_{args.preprocessing}.npz"
    )
    path = epath.Path(args.ref_stats or epath.Path(args.workdir) / "eval" / default)
    if path.exists():
        try:
            stats = fid.load_statistics(path)
        except ValueError as e:
            raise UsageError(str(e)) from None
        made_with = stats.meta.get("preprocessing", args.preprocessing)
        if made_with != args.preprocessing:
            raise UsageError(
                f"--ref_stats={path} was made with preprocessing {made_with!r}, not "
                f"--preprocessing={args.preprocessing}: the features are not comparable"
            )
        return stats, str(path), True
    real, _ = input_pipeline.load_split_as_array(config, split, args.max_examples)
    pool, _ = inception.compute_inception_features(
        ctx["inception_fn"], ctx["inception_vars"], real, batch_size=args.batch_size
    )
    meta = dict(dataset=config.data.name, split=split, preprocessing=args.preprocessing,
                image_size=config.data.image_size, features="FID Inception pool3")  # fmt: skip
    stats = fid.compute_statistics(pool, meta=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fid.save_statistics(path, stats)
    return stats, str(path), False


def _fid(ctx: dict[str, Any]) -> dict[str, Any]:
    from diffjax.evaluation import fid

    _inception_network(ctx)
    ref, path, reused = _reference_stats(ctx)  # before sampling: a bad file fails fast
    pool, _ = _inception_features(ctx)
    value = fid.frechet_distance_stats(fid.compute_statistics(pool), ref)
    return dict(
        fid=value, num_samples=int(pool.shape[0]), sampling=ctx["sampling"],
        reference=dict(path=path, num=ref.num, reused=reused, **ref.meta),
        preprocessing=ctx["args"].preprocessing, weights=ctx["weights"],
        network="FID Inception-v3 (inception-2015-12-05), pool3",
    )  # fmt: skip


def _is(ctx: dict[str, Any]) -> dict[str, Any]:
    from diffjax.evaluation import fid

    _, logits = _inception_features(ctx)
    splits = min(ctx["args"].is_splits, logits.shape[0])
    mean, std = fid.inception_score(logits, num_splits=splits)
    return dict(
        inception_score=mean, std=std, splits=splits, num_samples=int(logits.shape[0]),
        sampling=ctx["sampling"], preprocessing=ctx["args"].preprocessing,
        weights=ctx["weights"], classes="softmax over all 1008 logits",
    )  # fmt: skip


def _digits_fd(ctx: dict[str, Any]) -> dict[str, Any]:
    from diffjax.data import pipeline as input_pipeline
    from diffjax.evaluation import digits_classifier as dc
    from diffjax.evaluation import fid

    args, config = ctx["args"], ctx["config"]
    if config.data.name not in _CLASSIFIER_DATASETS:
        raise UsageError(
            f"digits_fd needs a grey labelled dataset; got {config.data.name!r}, "
            f"allowed: {', '.join(_CLASSIFIER_DATASETS)}"
        )
    split = args.split or config.data.eval_split
    train = input_pipeline.load_split_as_array(config, config.data.train_split)
    test = input_pipeline.load_split_as_array(config, split)
    cfg = dc.ClassifierConfig(num_classes=int(config.data.get("num_classes") or 10))
    cache = epath.Path(args.workdir) / "eval" / f"classifier_{config.data.name}_{split}.npz"
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Accuracy on the whole split; --max_examples caps only the reference set of the FD.
    params, accuracy, cached = dc.get_classifier(train, test, cache_path=str(cache), cfg=cfg)
    real = test[0][: args.max_examples]  # [N, H, W, C] uint8
    samples = _samples(ctx, args.num_samples or real.shape[0])
    real_feats, _ = dc.classifier_outputs(params, real, cfg)
    fake_feats, fake_logits = dc.classifier_outputs(params, samples, cfg)
    value = fid.frechet_distance_stats(
        fid.compute_statistics(fake_feats), fid.compute_statistics(real_feats)
    )
    score, _ = fid.inception_score(fake_logits, num_splits=1)
    return dict(
        digits_fd=value, digits_is=score, num_samples=int(samples.shape[0]),
        reference=dict(split=split, num=int(real.shape[0])), sampling=ctx["sampling"],
        classifier=dict(test_accuracy=accuracy, split=split, cache=str(cache), cached=cached,
                        features=f"penultimate layer ({cfg.hidden[-1]}-d)",
                        **dataclasses.asdict(cfg)),
        note="Frechet distance in a small digits classifier's features; not comparable to FID",
    )  # fmt: skip


_METRIC_FNS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "bpd": _bpd,
    "fid": _fid,
    "is": _is,
    "digits_fd": _digits_fd,
}

# The one number printed per metric.
_HEADLINE = {
    "bpd": "total_bpd",
    "fid": "fid",
    "is": "inception_score",
    "digits_fd": "digits_fd",
}


def _versions() -> dict[str, str]:
    import flax
    import jax
    import numpy as np
    import scipy

    import diffjax

    return dict(diffjax=diffjax.__version__, jax=jax.__version__, flax=flax.__version__,
                numpy=np.__version__, scipy=scipy.__version__)  # fmt: skip


def _run(args: argparse.Namespace) -> str:
    from diffjax.run import load_run

    try:
        run = load_run(args.workdir, args.step)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    config = run.config
    if args.data_dir is not None:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.data.data_dir = args.data_dir
    metrics = args.metrics
    from diffjax.training.watchdog import Watchdog

    ctx: dict[str, Any] = dict(run=run, args=args, config=config, watchdog=Watchdog(args.watchdog))
    results = {}
    for name in metrics:
        start = time.time()
        try:
            results[name] = _METRIC_FNS[name](ctx)
        except (FileNotFoundError, ValueError) as e:
            # A dataset that is not prepared, a config the data does not fit, ...: the library
            # raises these with one-line messages that name the bad value.
            raise UsageError(f"{name}: {e}") from None
        results[name]["time_s"] = round(time.time() - start, 2)

    out = epath.Path(args.out or epath.Path(args.workdir) / "eval" / f"step_{run.step}.json")
    record = json.loads(out.read_text()) if out.exists() else {}
    record.update(step=run.step, workdir=str(args.workdir), params="ema", versions=_versions())
    record.setdefault("metrics", {}).update(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    summary = ", ".join(f"{m} {results[m][_HEADLINE[m]]:.4f}" for m in metrics)
    return f"step {run.step}: {summary} (written to {out})"


def main(argv: Sequence[str] | None = None, *, configure_runtime: bool = False) -> int:
    """Run the command line; returns 0, or exits with status 2 on a usage error.

    ``configure_runtime``: apply ``cpu_runtime.configure`` for the run's compute dtype before
    any JAX computation and turn on the persistent compilation cache (the command line does; a
    caller that already computed with JAX need not).
    """
    try:
        args = parse_args(argv)
        _check_files(args)
        if configure_runtime:
            dtype = cli.run_compute_dtype(args.workdir)
            cpu_runtime.configure(dtype)
            cpu_runtime.enable_compilation_cache()
            cli.print_kernels(dtype)
        message = _run(args)
    except UsageError as e:
        _fail(str(e))
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main(configure_runtime=True))
