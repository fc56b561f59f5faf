"""Sample a trained run from the command line: a PNG grid and an .npz of uint8 images.

Usage::

    python -m diffjax.sample --workdir=RUN [--num=64] [--sampler=dpm++] [--steps=10] [--order=2]
        [--spacing=logsnr]
        [--out=FILE.png] [--eta=0.0] [--seed=0] [--class_label=3] [--guidance_scale=1.0]
        [--step=STEP] [--batch_size=16] [--watchdog_factor=20] [--watchdog_min_seconds=120]
        [--watchdog_first_seconds=0]

Options left out come from the run's ``config.sampling`` (``--num`` from ``num_samples``); the
parameters are the EMA parameters of the latest checkpoint (or ``--step``). ``--out`` defaults to
``RUN/samples/cli_<step>_<sampler><steps>_seed<seed>.png``; the .npz next to it (same basename)
holds ``images`` uint8 [N, H, W, C] and, for a class-conditional model, ``labels`` int32 [N].

Progress: a ``lax.scan`` has no per-step host callback, so the samples are drawn in chunks of
``--batch_size`` (one compiled program, called once per chunk; the last chunk is padded to the
same size and its extra samples dropped) and the progress bar counts chunks. Chunk ``c`` uses the
key ``fold_in(key(seed), c)``. Labels: ``--class_label`` for all samples, else a conditional
model cycles through the classes 0, 1, ..., num_classes - 1.

Watchdog (``diffjax.training.watchdog``): a batch that takes longer than
max(``--watchdog_factor`` x the median batch, ``--watchdog_min_seconds``) prints the Python
stacks and exits with status 124;
the first batch compiles and is only watched with ``--watchdog_first_seconds`` > 0.

Bad flags, a missing workdir or a workdir without checkpoint print one line
``diffjax.sample: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from typing import Any

from etils import epath

from diffjax import choices, errors
from diffjax.cli import common as cli

__all__ = ["main", "parse_args"]

EXIT_USAGE = cli.EXIT_USAGE
UsageError = cli.UsageError
_PROG = "diffjax.sample"


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = cli.OneLineParser(_PROG, prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="run directory (local path or gs://)")
    p.add_argument("--num", type=int, default=None, help="number of samples")
    p.add_argument("--sampler", default=None, help=f"one of {', '.join(choices.SAMPLERS)}")
    p.add_argument("--steps", type=int, default=None, help="sampling steps, 0 = all T (dpm++: 20)")
    p.add_argument("--order", type=int, default=None, help="dpm++ order: 1, 2 or 3")
    p.add_argument(
        "--spacing", default=None, help=f"dpm++ noise levels: {', '.join(choices.DPM_SPACINGS)}"
    )
    p.add_argument("--out", default=None, help="output PNG path (the .npz goes next to it)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--class_label", type=int, default=None, help="class of every sample")
    p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free w")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--batch_size", type=int, default=0, help="samples per compiled call (0: all at once)"
    )
    cli.add_watchdog_flags(p)
    return p


def parse_args(argv: Sequence[str] | None, prog: str | None = None) -> argparse.Namespace:
    """Parse and check the flags that need no run; raises UsageError naming the bad value.

    ``prog``: the command that ``--help`` shows (default ``python -m diffjax.sample``).
    """
    args = _parser(prog).parse_args(argv)
    checks = [
        ("num", args.num, args.num is None or args.num >= 1, "an integer >= 1"),
        (
            "sampler",
            args.sampler,
            args.sampler in (None, *choices.SAMPLERS),
            ", ".join(choices.SAMPLERS),
        ),
        ("steps", args.steps, args.steps is None or args.steps >= 0, "an integer >= 0"),
        ("order", args.order, args.order in (None, *choices.DPM_ORDERS), "1, 2 or 3"),
        (
            "spacing",
            args.spacing,
            args.spacing in (None, *choices.DPM_SPACINGS),
            ", ".join(choices.DPM_SPACINGS),
        ),
        ("eta", args.eta, args.eta is None or args.eta >= 0, "a number >= 0"),
        (
            "guidance_scale",
            args.guidance_scale,
            args.guidance_scale is None or args.guidance_scale >= 0,
            "a number >= 0",
        ),
        ("step", args.step, args.step is None or args.step >= 0, "an integer >= 0"),
        ("batch_size", args.batch_size, args.batch_size >= 0, "an integer >= 0"),
        (
            "out",
            args.out,
            args.out is None or args.out.lower().endswith(".png"),
            "a path ending in .png",
        ),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise UsageError(f"--{name}={value}: allowed: {allowed}")
    args.watchdog = cli.watchdog_settings(args)
    return args


def _check_workdir(workdir: str) -> None:
    """Fail before importing jax when the workdir cannot hold a run."""
    cli.check_run_dir(workdir)


def _labels(num_classes: int, class_label: int | None, total: int) -> Any:
    import numpy as np

    if not num_classes:
        if class_label is not None:
            raise UsageError(f"--class_label={class_label}: the model is unconditional")
        return None
    if class_label is None:
        return (np.arange(total) % num_classes).astype(np.int32)  # [total]
    if not 0 <= class_label < num_classes:
        raise UsageError(
            f"--class_label={class_label}: allowed: an integer in [0, {num_classes - 1}]"
        )
    return np.full((total,), class_label, np.int32)


def _run(args: argparse.Namespace) -> str:
    import jax
    import numpy as np
    from absl import logging
    from tqdm import tqdm

    from diffjax.data import images
    from diffjax.run import load_run, resolve_sampling_options
    from diffjax.training import checkpointing
    from diffjax.training.watchdog import Watchdog

    # Checkpoint restoring logs orbax warnings that are no concern of a sampling command.
    logging.set_verbosity(logging.ERROR)
    # Check the flags against the config before the (slow) restore of the parameters.
    config = checkpointing.load_config(args.workdir)
    try:
        sampler, options = resolve_sampling_options(
            config,
            sampler=args.sampler,
            steps=args.steps,
            eta=args.eta,
            order=args.order,
            spacing=args.spacing,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    num = args.num if args.num is not None else int(config.sampling.num_samples)
    num_classes = int(config.model.num_classes or 0)
    if args.guidance_scale and not num_classes:
        raise UsageError(f"--guidance_scale={args.guidance_scale}: the model is unconditional")
    devices = jax.local_devices()
    per_call = args.batch_size or num
    per_call = math.ceil(per_call / len(devices)) * len(devices)  # a multiple of the devices
    chunks = math.ceil(num / per_call)
    labels = _labels(num_classes, args.class_label, chunks * per_call)
    try:
        run = load_run(args.workdir, args.step)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None

    # DDIM: num_steps; DDPM: the respaced timesteps, or all T.
    steps = (
        options.get("num_steps") or len(options.get("timesteps", ())) or run.schedule.num_timesteps
    )

    key = jax.random.key(args.seed)
    out = []
    dog = Watchdog(args.watchdog)
    bar = tqdm(range(chunks), desc=f"{sampler}, {steps} steps", unit="batch", file=sys.stderr)
    for c in bar:
        with dog.watch("sampling batch", f"batch {c + 1} of {chunks}, {per_call} samples"):
            x = run.sample(
                jax.random.fold_in(key, c),
                per_call,
                sampler=sampler,
                steps=args.steps,
                eta=args.eta,
                order=args.order,
                spacing=args.spacing,
                y=None if labels is None else labels[c * per_call : (c + 1) * per_call],
                guidance_scale=args.guidance_scale,
                devices=devices,
            )
            out.append(images.to_uint8(x))  # [per_call, H, W, C]; waits for the chunk
    samples = np.concatenate(out)[:num]

    png = epath.Path(args.out or _default_out(args, run.step, sampler, steps))
    images.save_image_grid(samples, png)
    arrays = {"images": samples}
    if labels is not None:
        arrays["labels"] = labels[:num]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    png.with_suffix(".npz").write_bytes(buffer.getvalue())
    return (
        f"wrote {num} samples of step {run.step} ({sampler}, {steps} steps) to {png} "
        f"and {png.with_suffix('.npz')}"
    )


def _default_out(args: argparse.Namespace, step: int, sampler: str, steps: int) -> epath.Path:
    name = f"cli_{step}_{sampler}{steps}_seed{args.seed}.png"
    return epath.Path(args.workdir) / "samples" / name


def main(
    argv: Sequence[str] | None = None, *, configure_runtime: bool = False, prog: str | None = None
) -> int:
    """Run the command line; returns 0, or exits with status 2 on a usage error.

    ``configure_runtime``: apply ``cpu_runtime.configure`` for the run's dtype and kernels before
    any JAX computation and turn on the persistent compilation cache (the command line does; a
    caller that already computed with JAX need not). ``prog``: the command ``--help`` shows
    (``diffjax sample``; default ``python -m diffjax.sample``). Errors, bad flags included,
    are one ``diffjax.sample: error: ...`` line (``diffjax.errors.exit_on_reportable_error``).
    """
    with errors.exit_on_reportable_error(prog=_PROG):
        args = parse_args(argv, prog)
        _check_workdir(args.workdir)
        if configure_runtime:
            cli.configure_runtime_for(args.workdir)
        message = _run(args)
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main(configure_runtime=True))
