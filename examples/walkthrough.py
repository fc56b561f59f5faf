r"""A tour of diffjax on 8x8 handwritten digits: train, look inside, sample two ways.

    python examples/walkthrough.py                    # the default digits run, ~5-10 CPU minutes
    python examples/walkthrough.py --tiny             # a tiny model for a smoke test, ~1-2 minutes
    python examples/walkthrough.py --workdir=workdirs/digits   # reuse (or resume) an existing run

``DIFFJAX_WALKTHROUGH_TINY=1`` in the environment selects the tiny mode as well.

What it does, step by step (the text of docs/how-it-works.md explains the maths):

1. trains the default config (``configs/digits.py``: T = 1000, linear betas, eps prediction,
   L_simple) with ``diffjax.training.loop.train_and_evaluate``; a workdir that already holds the
   final checkpoint is reused, a partial one resumed;
2. draws every figure of the run with ``diffjax.viz.write_run_figures`` into
   ``WORKDIR/figures``: the forward process, a reverse trajectory, the schedules, the training
   curve and the terms of the variational bound;
3. samples the trained model with ancestral DDPM on all T steps and with deterministic DDIM
   (eta = 0) on a few steps, from the same seed, times both, and puts the two grids side by side
   in ``WORKDIR/figures/samplers.png``;
4. prints where everything is.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from diffjax import viz
from diffjax.data import images
from diffjax.run import load_run
from diffjax.training import loop as training

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_ENV = "DIFFJAX_WALKTHROUGH_TINY"
NUM_SAMPLES = 36  # 6 x 6 grid per sampler


def default_config() -> ml_collections.ConfigDict:
    """``configs/digits.py``, the config that ``python train.py`` runs."""
    spec = importlib.util.spec_from_file_location("digits_config", REPO / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config() -> ml_collections.ConfigDict:
    """The default config shrunk to run end to end in 1-2 minutes on 2 CPU cores.

    Same data and diffusion (linear betas, eps, L_simple), T = 100 steps; a one-level U-Net with
    32 channels and 200 training steps: the samples are blurry digit-like blobs, not digits.
    """
    config = default_config()
    config.diffusion.num_timesteps = 100
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    t = config.training
    t.num_train_steps, t.batch_size = 200, 32
    t.log_every_steps, t.checkpoint_every_steps, t.sample_every_steps = 20, 200, 200
    t.ema_decay = 0.99  # a short run: the EMA must forget the initial weights quickly
    config.optimizer.warmup_steps = 20
    config.sampling.num_samples = 16
    config.evaluation.num_samples, config.evaluation.bpd_examples = 128, 8
    return config


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (or resume) the run in ``workdir`` up to ``config.training.num_train_steps``.

    ``train_and_evaluate`` is what ``python train.py`` runs: it logs the loss to TensorBoard
    (``WORKDIR/events.out.tfevents.*``), keeps checkpoints with parameters, EMA parameters and
    optimizer state in ``WORKDIR/checkpoints`` and writes sample grids to ``WORKDIR/samples``.
    A workdir that already holds the final checkpoint returns at once.
    """
    result = training.train_and_evaluate(config, workdir)
    return result.metrics


def compare_samplers(workdir: str, *, ddim_steps: int, seed: int = 0) -> dict[str, Any]:
    """Sample the run with DDPM (all T steps) and DDIM (eta = 0, ``ddim_steps``); time both.

    Each sampler is called twice with the same key: the first call compiles the sampling loop
    (one XLA program for all steps), the second measures sampling alone. The same key gives both
    samplers the same x_T, so the grids can be compared image by image.
    """
    run = load_run(workdir)
    n_t = run.schedule.num_timesteps
    key = jax.random.key(seed)
    num = -(-NUM_SAMPLES // jax.local_device_count()) * jax.local_device_count()
    y = np.arange(num) % run.num_classes if run.num_classes else None
    settings = {
        "ddpm": dict(sampler="ddpm", steps=0),
        "ddim": dict(sampler="ddim", steps=ddim_steps, eta=0.0),
    }
    results: dict[str, Any] = {}
    for name, kwargs in settings.items():
        start = time.perf_counter()
        jax.block_until_ready(run.sample(key, num, y=y, **kwargs))
        first = time.perf_counter() - start
        start = time.perf_counter()
        x = np.asarray(jax.block_until_ready(run.sample(key, num, y=y, **kwargs)))[:NUM_SAMPLES]
        seconds = time.perf_counter() - start
        results[name] = dict(samples=x, seconds=seconds, compile_seconds=first - seconds)
    out = pathlib.Path(workdir) / "figures"
    for name, r in results.items():
        r["path"] = str(out / f"samples_{name}.png")
        images.save_image_grid(r["samples"], r["path"])
    titled = {
        f"DDPM, {n_t} steps: {results['ddpm']['seconds']:.2f} s": results["ddpm"]["samples"],
        f"DDIM (eta = 0), {ddim_steps} steps: {results['ddim']['seconds']:.2f} s": results["ddim"][
            "samples"
        ],
    }
    results["figure"] = viz.sample_comparison(
        titled,
        out / "samplers.png",
        title=f"Samples of the same model from the same x_T (step {run.step} EMA weights)",
    )
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="run directory (default: workdirs/walkthrough)")
    p.add_argument(
        "--tiny",
        action="store_true",
        default=os.environ.get(TINY_ENV, "") not in ("", "0"),
        help=f"tiny model and T = 100, for a smoke test (also ${TINY_ENV}=1)",
    )
    p.add_argument(
        "--ddim_steps",
        type=int,
        default=None,
        help="DDIM steps (default 50; tiny: 10)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = tiny_config() if args.tiny else default_config()
    name = "walkthrough_tiny" if args.tiny else "walkthrough"
    workdir = args.workdir or str(REPO / "workdirs" / name)
    ddim_steps = args.ddim_steps or (10 if args.tiny else 50)
    if args.tiny:
        # A smoke test compiles more than it computes: trade run time for compile time.
        jax.config.update("jax_disable_most_optimizations", True)
    total = time.perf_counter()

    print(f"[1/3] training {'the tiny' if args.tiny else 'the default'} digits model in {workdir}")
    start = time.perf_counter()
    metrics = train(config, workdir)
    train_seconds = time.perf_counter() - start
    if metrics:
        print(f"      final loss {metrics['loss']:.4f}")

    print("[2/3] drawing the figures of the run")
    start = time.perf_counter()
    figures = viz.write_run_figures(
        workdir,
        num_images=4 if args.tiny else 6,
        num_samples=NUM_SAMPLES,
        num_vlb_examples=16 if args.tiny else 64,
    )
    figure_seconds = time.perf_counter() - start

    print("[3/3] sampling with DDPM and DDIM")
    comparison = compare_samplers(workdir, ddim_steps=ddim_steps)
    figures["samplers"] = comparison["figure"]

    ddpm, ddim = comparison["ddpm"], comparison["ddim"]
    print()
    print(f"run directory    {workdir}")
    print(f"  config         {pathlib.Path(workdir) / 'config.json'}")
    print(f"  checkpoints    {pathlib.Path(workdir) / 'checkpoints'}")
    print(f"  training grids {pathlib.Path(workdir) / 'samples'}")
    print(f"  TensorBoard    tensorboard --logdir={workdir}")
    print("figures")
    for name, path in figures.items():
        print(f"  {name:14s} {path}")
    print("samplers (sampling time after compilation)")
    print(f"  DDPM, all steps     {ddpm['seconds']:7.2f} s   {ddpm['path']}")
    print(f"  DDIM, {ddim_steps:3d} steps     {ddim['seconds']:7.2f} s   {ddim['path']}")
    print(
        f"time: training {train_seconds:.0f} s, figures {figure_seconds:.0f} s, "
        f"total {time.perf_counter() - total:.0f} s"
    )
    print(f"redraw the figures of any run with: python -m diffjax.viz --workdir={workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
