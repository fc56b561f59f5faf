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
import json
import sys
from collections.abc import Sequence

from etils import epath

from diffjax import choices, errors
from diffjax.cli import common as cli

__all__ = ["main", "parse_args"]

EXIT_USAGE = cli.EXIT_USAGE
UsageError = cli.UsageError
_PROG = "diffjax.evaluate"
# Repeated from diffjax.evaluation.run_metrics (and diffjax.evaluation.inception) so that flags
# are checked before jax is imported.
METRICS = ("bpd", "fid", "is", "digits_fd")
_PREPROCESSING = ("tf1", "pytorch_fid")
_CONDITIONS = ("label", "null")
_CLASSIFIER_DATASETS = ("digits", "mnist")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = cli.OneLineParser(_PROG, prog=prog, description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--workdir", required=True, help="run directory (local path or gs://)")
    add("--metrics", default=None, help=f"comma-separated subset of {','.join(METRICS)}")
    add("--step", type=int, default=None, help="checkpoint step (default: latest)")
    add("--num_samples", type=int, default=None, help="samples for fid/is/digits_fd")
    add("--sampler", default=None, help=f"one of {', '.join(choices.SAMPLERS)} (default: config)")
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


def parse_args(argv: Sequence[str] | None, prog: str | None = None) -> argparse.Namespace:
    """Parse and check the flags that need no run; raises UsageError naming the bad value.

    ``prog``: the command that ``--help`` shows (default ``python -m diffjax.evaluate``).
    """
    args = _parser(prog).parse_args(argv)
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
        ("sampler", args.sampler, args.sampler in (None, *choices.SAMPLERS),
         ", ".join(choices.SAMPLERS)),
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


def _run(args: argparse.Namespace) -> str:
    from diffjax.evaluation import records, run_metrics
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

    ctx = run_metrics.MetricContext(
        run=run,
        config=config,
        options=run_metrics.MetricOptions.from_namespace(args),
        watchdog=Watchdog(args.watchdog),
    )
    results = run_metrics.evaluate_metrics(ctx, metrics)

    out = records.merge_record(
        args.out or records.record_path(args.workdir, run.step),
        step=run.step,
        workdir=str(args.workdir),
        results=results,
    )
    headline = run_metrics.HEADLINES
    summary = ", ".join(f"{m} {results[m][headline[m]]:.4f}" for m in metrics)
    return f"step {run.step}: {summary} (written to {out})"


def main(
    argv: Sequence[str] | None = None, *, configure_runtime: bool = False, prog: str | None = None
) -> int:
    """Run the command line; returns 0, or exits with status 2 on a usage error.

    ``configure_runtime``: apply ``cpu_runtime.configure`` for the run's dtype and kernels before
    any JAX computation and turn on the persistent compilation cache (the command line does; a
    caller that already computed with JAX need not). ``prog``: the command ``--help`` shows
    (``diffjax evaluate``; default ``python -m diffjax.evaluate``). Errors, bad flags included,
    are one ``diffjax.evaluate: error: ...`` line (``diffjax.errors.exit_on_reportable_error``).
    """
    with errors.exit_on_reportable_error(prog=_PROG):
        args = parse_args(argv, prog)
        _check_files(args)
        if configure_runtime:
            cli.configure_runtime_for(args.workdir)
        message = _run(args)
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main(configure_runtime=True))
