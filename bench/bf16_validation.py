"""bfloat16 compute vs float32 on the default (digits) config: loss curve, sample quality, speed.

Trains the default config twice from the same seed (same initial parameters, same batches, same
noise), once with ``model.dtype=float32`` and once with ``model.dtype=bfloat16`` (parameters,
gradients and optimizer state stay float32 in both), then compares the logged training loss in
windows of steps, the final EMA model's digits-classifier Frechet distance on DDIM samples and
the test bits/dim, and the wall time of each run.

    python bench/bf16_validation.py --workdir /tmp/bf16_validation
    python bench/bf16_validation.py --workdir /tmp/v --steps 500   # a quicker, rougher check

Each run is ``python train.py`` in a subprocess, then ``python -m diffjax.evaluate``; existing
runs in ``--workdir`` are reused (training resumes to ``--steps``), so a second call only
re-evaluates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DTYPES = ("float32", "bfloat16")


def train(workdir: str, dtype: str, steps: int) -> float:
    """Train the default config with compute ``dtype``; returns wall seconds (incl. compile)."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "digits.py"),
        f"--workdir={workdir}",
        f"--config.model.dtype={dtype}",
        f"--config.training.num_train_steps={steps}",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def evaluate(workdir: str, num_samples: int) -> dict:
    out = os.path.join(workdir, "bf16_validation_eval.json")
    cmd = [
        sys.executable,
        "-m",
        "diffjax.evaluate",
        f"--workdir={workdir}",
        "--metrics=digits_fd,bpd",
        f"--num_samples={num_samples}",
        "--sampler=ddim",
        "--steps=100",
        "--max_examples=256",
        f"--out={out}",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(out) as f:
        return json.load(f)


def windows(steps: np.ndarray, values: np.ndarray, width: int) -> dict[int, float]:
    """Mean of the logged values in each window (lo, lo + width] of steps."""
    out = {}
    for hi in range(width, int(steps.max()) + 1, width):
        sel = (steps > hi - width) & (steps <= hi)
        if sel.any():
            out[hi] = float(values[sel].mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="folder for the two runs")
    p.add_argument("--steps", type=int, default=2000, help="train steps (default: the config's)")
    p.add_argument("--window", type=int, default=250, help="steps per loss window")
    p.add_argument("--num_samples", type=int, default=512, help="samples for digits_fd")
    args = p.parse_args()

    from diffjax.viz.events import read_scalars

    curves, evals, walls = {}, {}, {}
    for dtype in DTYPES:
        wd = os.path.join(args.workdir, dtype)
        walls[dtype] = train(wd, dtype, args.steps)
        steps, loss = read_scalars(wd)["loss"]
        curves[dtype] = windows(steps, loss, args.window)
        evals[dtype] = evaluate(wd, args.num_samples)

    print(f"\nloss (eps-MSE), mean over each window of {args.window} steps")
    print(f"{'steps':>12s} {'float32':>9s} {'bfloat16':>9s} {'bf16/f32':>9s}")
    for hi in sorted(curves["float32"]):
        a, b = curves["float32"][hi], curves["bfloat16"].get(hi, float("nan"))
        print(f"{hi - args.window + 1:>5d}-{hi:<6d} {a:9.4f} {b:9.4f} {b / a:9.3f}")
    for dtype in DTYPES:
        metrics = evals[dtype]["metrics"]
        shown = ", ".join(
            f"{key} {metrics[name][key]:.4g}"
            for name, key in (("bpd", "total_bpd"), ("digits_fd", "digits_fd"))
            if name in metrics
        )
        print(f"{dtype:9s} wall {walls[dtype]:4.0f} s (training + final samples); {shown}")


if __name__ == "__main__":
    main()
