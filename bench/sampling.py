"""Sampling speed: per-step cost of the ``lax.scan`` samplers vs one network call, images/s.

Measures, for one workload and batch (random parameters; speed does not depend on them):
  * one jitted network forward (the unit of work of a sampling step),
  * ancestral DDPM sampling (Ho et al. 2020 Alg. 2) over ``--ddpm-steps`` steps (default all
    1000), DDIM (Song et al. 2021 eq. 12, eta = 0) over ``--ddim-steps`` steps and
    DPM-Solver++ (Lu et al. 2022b, ``--dpm-order``, logSNR levels), SDE-DPM-Solver++ and UniPC
    (Zhao et al. 2023, same order and levels) over each of ``--dpm-steps``, each compiled once
    as a whole ``lax.scan`` program, with images/s,
  * the scan overhead per step: (sampler time / steps) / forward time - 1 (this includes the
    sampler's own elementwise work: posterior mean, noise),
  * the DDPM / DDIM wall-time ratio.

    python bench/sampling.py --workload digits --batch 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import WORKLOADS, environment, make_model, median_seconds  # noqa: E402

from diffjax.core.sampling import (  # noqa: E402
    SAMPLERS,
    ddim_sample,
    make_model_fn,
    sample,
)
from diffjax.core.schedules import make_schedule  # noqa: E402
from diffjax.models import init_params  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--ddpm-steps", type=int, default=1000)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--dpm-steps", default="10,20", help="comma-separated DPM-Solver++ steps")
    p.add_argument("--dpm-order", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    print(environment())
    model, size, channels = make_model(args.workload, getattr(jnp, args.dtype))
    params = init_params(model, jax.random.key(0), size, channels)
    schedule = make_schedule("linear", 1000)
    model_fn = make_model_fn(model, params)
    shape = (args.batch, size, size, channels)
    x = jax.random.normal(jax.random.key(1), shape)
    t = jnp.full((args.batch,), 500, jnp.int32)

    fwd = jax.jit(model_fn)
    fwd_s, _ = median_seconds(lambda: fwd(x, t).block_until_ready(), 2, max(args.runs, 10))

    ddpm_ts = None
    if args.ddpm_steps != 1000:
        from diffjax.core.sampling import space_timesteps

        ddpm_ts = space_timesteps(1000, args.ddpm_steps)
    ddpm = jax.jit(lambda r: sample(model_fn, schedule, r, shape, timesteps=ddpm_ts))
    ddim = jax.jit(lambda r: ddim_sample(model_fn, schedule, r, shape, num_steps=args.ddim_steps))
    runs = [("ddpm", ddpm, args.ddpm_steps), ("ddim", ddim, args.ddim_steps)]
    for k in (int(v) for v in args.dpm_steps.split(",") if v):
        for name in ("dpm++", "sde-dpm++", "unipc"):
            solver = SAMPLERS[name]
            fn = jax.jit(
                lambda r, k=k, solver=solver: solver(
                    model_fn, schedule, r, shape, num_steps=k, order=args.dpm_order
                )
            )
            runs.append((f"{name}{k}", fn, k))
    rng = jax.random.key(2)
    results = {}
    for name, fn, steps in runs:
        t0 = time.perf_counter()
        compiled = fn.lower(rng).compile()
        compile_s = time.perf_counter() - t0
        med, times = median_seconds(lambda c=compiled: c(rng).block_until_ready(), 1, args.runs)
        results[name] = med
        overhead = med / steps / fwd_s - 1.0
        print(
            f"{name}: {steps} steps, median {med:.3f} s ({med / steps * 1e3:.2f} ms/step, "
            f"{args.batch / med:.1f} images/s), compile {compile_s:.1f} s, scan overhead "
            f"{100 * overhead:+.1f}% of a forward, runs {[round(v, 3) for v in times]}"
        )
    print(
        f"workload {args.workload}, batch {args.batch}, dtype {args.dtype}: "
        f"forward {fwd_s * 1e3:.2f} ms; DDPM-{args.ddpm_steps} / DDIM-{args.ddim_steps} "
        f"wall ratio {results['ddpm'] / results['ddim']:.1f}x"
    )


if __name__ == "__main__":
    main()
