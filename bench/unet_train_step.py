"""Train-step throughput of the diffjax U-Net (forward + MSE + backward + Adam), JAX only.

For each workload, batch size and compute dtype: median step time over --runs timed steps after
--warmup steps, images/s, achieved GFLOP/s in the model's FLOPs (XLA's cost analysis of the
step with direct convolutions, ``common.model_flops``: Winograd layers do fewer), the
percentage of the nominal float32 peak and of the measured float32 matmul rate, compile time,
and the process's peak RSS (a high-water mark: each row shows the largest RSS so far).

    python bench/unet_train_step.py --workloads digits,small32,cifar10 \
        --batches 64:128,64,16:32 --dtypes float32,bfloat16 --runs 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import (  # noqa: E402
    FP32_PEAK_GFLOPS,
    WORKLOADS,
    environment,
    make_inputs,
    make_model,
    make_train_step,
    matmul_gflops,
    median_seconds,
    model_flops,
    peak_rss_mib,
)

from diffjax.choices import KERNELS  # noqa: E402
from diffjax.models import init_params  # noqa: E402


def bench_one(
    name: str, batch: int, dtype: str, warmup: int, runs: int, kernels: str = "tuned"
) -> dict:
    model, size, channels = make_model(name, getattr(jnp, dtype), kernels)
    params = init_params(model, jax.random.key(0), size, channels)
    step, opt = make_train_step(model)
    state = [params, opt.init(params)]
    x, t, target = make_inputs(batch, size, channels)
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = step.lower(state[0], state[1], x, t, target, rng).compile()
    compile_s = time.perf_counter() - t0
    flops = model_flops(model, state[0], state[1], x, t, target, rng)

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], x, t, target, rng)
        loss.block_until_ready()

    med, times = median_seconds(run, warmup, runs)
    return dict(
        workload=name,
        batch=batch,
        dtype=dtype,
        median_s=med,
        times=times,
        img_s=batch / med,
        gflops=flops / med / 1e9,
        gflop_step=flops / 1e9,
        compile_s=compile_s,
        rss=peak_rss_mib(),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="digits,small32,cifar10")
    p.add_argument(
        "--batches",
        default="64,64,16:32",
        help="per workload, ':'-separated batch sizes; comma-separated across workloads",
    )
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--kernels",
        choices=KERNELS,
        default="tuned",
        help="model.kernels: the tuned kernels (default), the plain reference, or oneDNN",
    )
    args = p.parse_args()
    names = args.workloads.split(",")
    batches = [[int(b) for b in s.split(":")] for s in args.batches.split(",")]
    if len(batches) != len(names):
        raise SystemExit(f"--batches has {len(batches)} groups for {len(names)} workloads")
    for n in names:
        if n not in WORKLOADS:
            raise SystemExit(f"unknown workload {n!r}; allowed: {', '.join(WORKLOADS)}")

    print(environment(args.kernels))
    mm = matmul_gflops()
    print(
        f"nominal fp32 peak {FP32_PEAK_GFLOPS:.0f} GFLOP/s (%pk); measured float32 matmul rate "
        f"{mm:.0f} GFLOP/s (%mm: jnp.dot of two 2048x2048 matrices, median of 9)"
    )
    header = (
        f"{'workload':9s} {'batch':>5s} {'dtype':9s} {'median s':>9s} {'img/s':>8s} "
        f"{'GFLOP/step':>10s} {'GFLOP/s':>8s} {'%pk':>5s} {'%mm':>5s} {'compile s':>9s} "
        f"{'RSS MiB':>8s}"
    )
    print(header)
    for name, bs in zip(names, batches, strict=True):
        for batch in bs:
            for dtype in args.dtypes.split(","):
                r = bench_one(name, batch, dtype, args.warmup, args.runs, args.kernels)
                print(
                    f"{r['workload']:9s} {r['batch']:5d} {r['dtype']:9s} {r['median_s']:9.3f} "
                    f"{r['img_s']:8.1f} {r['gflop_step']:10.1f} {r['gflops']:8.1f} "
                    f"{100 * r['gflops'] / FP32_PEAK_GFLOPS:5.0f} {100 * r['gflops'] / mm:5.0f} "
                    f"{r['compile_s']:9.1f} "
                    f"{r['rss']:8.0f}   runs {[round(v, 3) for v in r['times']]}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
