"""Every figure of a trained run, and the command line ``python -m diffjax.viz``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffjax import errors
from diffjax.cli import common as cli
from diffjax.data import images
from diffjax.viz.canvas import PathLike
from diffjax.viz.curves import evaluation_curves, schedule_curves, training_curves, vlb_terms
from diffjax.viz.events import read_scalars
from diffjax.viz.strips import forward_process_strip, reverse_process_strip

__all__ = ["main", "write_run_figures"]

# Noise levels of the forward strip, as fractions of T: dense at the start, where the schedule
# changes the image fastest for its first steps' small betas.
_FORWARD_FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def write_run_figures(
    workdir: PathLike,
    *,
    step: int | None = None,
    num_images: int = 6,
    num_samples: int = 64,
    num_vlb_examples: int = 64,
    trajectory_columns: int = 10,
    seed: int = 0,
) -> dict[str, str]:
    """Write every figure of the run in ``workdir`` into ``workdir/figures``; return name -> path.

    Figures: ``forward.png`` (test images noised), ``reverse.png`` (an ancestral sampling
    trajectory of the EMA model for ``num_images`` samples), ``samples.png`` (``num_samples``
    samples with the run's ``config.sampling`` sampler), ``schedules.png``,
    ``training.png`` (skipped if the run has no event files), ``evaluation.png`` (the curves
    of evaluation during training beside the training loss; only if the run has ``eval/``
    scalars) and ``vlb_terms.png`` (the full bound on ``num_vlb_examples`` test images; 0 skips
    it: it runs the network T times).
    """
    from diffjax.data.pipeline import load_split_as_array
    from diffjax.evaluation import bpd
    from diffjax.run import load_run

    for name, value in (("num_images", num_images), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}; allowed: an integer >= 1")
    run = load_run(workdir, step)
    cfg, n_t = run.config, run.schedule.num_timesteps
    out = epath.Path(workdir) / "figures"
    key = jax.random.key(seed)
    paths: dict[str, str] = {}
    split = cfg.data.get("eval_split", "test")
    data, _ = load_split_as_array(cfg, split, max(num_images, num_vlb_examples))  # uint8

    ts = np.unique(np.round(np.asarray(_FORWARD_FRACTIONS) * (n_t - 1)).astype(np.int32))
    paths["forward"] = forward_process_strip(
        data[:num_images], run.schedule, ts, out / "forward.png", jax.random.fold_in(key, 0)
    )

    devices = jax.local_devices()
    num = -(-num_images // len(devices)) * len(devices)  # a multiple of the device count
    y = np.arange(num) % run.num_classes if run.num_classes else None
    stride = max(1, (n_t - 1) // max(1, trajectory_columns - 1))
    _, traj = run.sample(
        jax.random.fold_in(key, 1),
        num,
        sampler="ddpm",
        steps=0,
        y=y,
        return_trajectory=True,
        trajectory_stride=stride,
    )
    paths["reverse"] = reverse_process_strip(
        traj.x_t,
        traj.pred_x0,
        np.asarray(traj.t),
        out / "reverse.png",
        max_images=num_images,
        max_columns=trajectory_columns,
    )
    num = -(-num_samples // len(devices)) * len(devices)
    y = np.arange(num) % run.num_classes if run.num_classes else None
    samples = run.sample(jax.random.fold_in(key, 3), num, y=y)  # the config's sampler
    images.save_image_grid(np.asarray(samples)[:num_samples], out / "samples.png")
    paths["samples"] = str(out / "samples.png")

    paths["schedules"] = schedule_curves(
        out / "schedules.png", n_t, highlight=cfg.diffusion.schedule
    )
    try:
        paths["training"] = training_curves(workdir, out / "training.png")
        if any(tag.startswith("eval/") for tag in read_scalars(workdir)):
            paths["evaluation"] = evaluation_curves(workdir, out / "evaluation.png")
    except FileNotFoundError as e:
        print(f"skipping training.png and evaluation.png: {e}", file=sys.stderr)

    if num_vlb_examples > 0:

        def apply_fn(params: Any, x_t: jax.Array, t: jax.Array, y: Any) -> jax.Array:
            return run.model.apply({"params": params}, x_t, t, y, train=False)

        step_fn = bpd.make_bpd_step(
            apply_fn,
            run.schedule,
            mean_type=cfg.diffusion.mean_type,
            var_type=cfg.diffusion.var_type,
        )
        x0 = jnp.asarray(data[:num_vlb_examples], jnp.float32) / 127.5 - 1.0  # [B, H, W, C]
        result = step_fn(run.params, x0, None, jax.random.fold_in(key, 2))
        summary = bpd.accumulate_bpd([(jax.device_get(result), np.ones(x0.shape[0], bool))])
        paths["vlb_terms"] = vlb_terms(summary, out / "vlb_terms.png")
    return paths


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """``python -m diffjax.viz --workdir=RUN``: write all figures of a run; print their paths.

    A bad flag or an unusable run prints one line ``diffjax.viz: error: ...`` and exits with 2
    (``diffjax.errors.exit_on_reportable_error``). ``prog``: the command ``--help`` shows
    (``diffjax viz``; default ``python -m diffjax.viz``).
    """
    parser = cli.OneLineParser(
        "diffjax.viz",
        prog=prog,
        description="Write every figure of a trained run into RUN/figures; print their paths.",
    )
    parser.add_argument("--workdir", required=True, help="run directory (local or gs://)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--num_images", type=int, default=6, help="images in the strips")
    parser.add_argument("--num_samples", type=int, default=64, help="images in samples.png")
    parser.add_argument(
        "--num_vlb_examples", type=int, default=64, help="test images for the bound (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    with errors.exit_on_reportable_error(prog="diffjax.viz"):
        args = parser.parse_args(argv)
        try:
            paths = write_run_figures(
                args.workdir,
                step=args.step,
                num_images=args.num_images,
                num_samples=args.num_samples,
                num_vlb_examples=args.num_vlb_examples,
                seed=args.seed,
            )
        except (FileNotFoundError, ValueError) as e:
            raise cli.UsageError(str(e)) from None
    for name, p in paths.items():
        print(f"{name:10s} {p}")
    return 0
