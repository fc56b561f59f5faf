"""diffjax U-Net vs diffusers UNet2DModel (torch, CPU): train-step time side by side, alternating.

The torch model is the same architecture (google/ddpm-cifar10-32 layout for the CIFAR-10 workload),
randomly initialised (nothing is downloaded); both sides must have the same parameter count. A
train step is forward + MSE loss + backward + Adam update on the same batch shape, with the same
number of threads. Steps alternate JAX, torch, JAX, ... so that machine noise hits both alike.
Time one JAX dtype per process for the published numbers: a float32 and a bfloat16 program
alternating in one process slow the float32 step by 10-15% (bench/README.md).

    python bench/vs_torch.py --workload cifar10 --batch 16 --dtypes float32 --runs 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Spinning OpenMP workers (the default) collapse torch's speed by 10-40x as soon as anything
# else uses the cores, including the JAX step run in between; passive waiting only helps torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    WORKLOADS,
    environment,
    make_inputs,
    make_model,
    make_train_step,
    model_flops,
    peak_rss_mib,
)

from diffjax.choices import KERNELS  # noqa: E402
from diffjax.models import init_params  # noqa: E402


def torch_model(name: str):
    """diffusers UNet2DModel with the architecture of ``WORKLOADS[name]`` (random init)."""
    from diffusers import UNet2DModel

    fields, size, channels = WORKLOADS[name]
    ch = fields.get("ch", 128)
    mult = fields.get("ch_mult", (1, 2, 2, 2))
    attn = fields.get("attn_resolutions", (16,))
    levels = range(len(mult))
    has_attn = [size // 2**i in attn for i in levels]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn))
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=fields.get("out_channels", 3),
        block_out_channels=tuple(ch * m for m in mult),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=fields.get("num_res_blocks", 2),
        attention_head_dim=None,  # one head, as the DDPM model
        norm_eps=1e-6,
        norm_num_groups=fields.get("num_groups", 32),
        dropout=fields.get("dropout", 0.1),
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        act_fn="silu",
        time_embedding_type="positional",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="cifar10")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtypes", default="float32", help="JAX compute dtypes (comma-separated)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--kernels",
        choices=KERNELS,
        default="tuned",
        help="model.kernels: the tuned kernels (default), the plain reference, or oneDNN",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(environment(args.kernels))
    # What torch dispatches to: ATen's vector kernels (ATEN_CPU_CAPABILITY can hold them to
    # avx2) and oneDNN's (ONEDNN_MAX_CPU_ISA), for a run that stands for another CPU.
    print(
        f"torch threads: {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"ATen CPU capability: {torch.backends.cpu.get_cpu_capability()}, "
        f"MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS', '')!r}"
    )

    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            raise SystemExit(f"unknown dtype {d!r}; allowed: float32, bfloat16")
    jax_steps = {}
    for d in dtypes:
        model, size, channels = make_model(args.workload, getattr(jnp, d), args.kernels)
        params = init_params(model, jax.random.key(0), size, channels)
        n_jax = sum(x.size for x in jax.tree.leaves(params))
        step, opt = make_train_step(model)
        x, t, target = make_inputs(args.batch, size, channels)
        rng = jax.random.key(1)
        t0 = time.perf_counter()
        compiled = step.lower(params, opt.init(params), x, t, target, rng).compile()
        compile_s = time.perf_counter() - t0
        state = [params, opt.init(params)]

        def jax_step(compiled=compiled, state=state, x=x, t=t, target=target, rng=rng):
            state[0], state[1], loss = compiled(state[0], state[1], x, t, target, rng)
            loss.block_until_ready()

        flops = model_flops(model, params, opt.init(params), x, t, target, rng)
        jax_steps[d] = (jax_step, flops, compile_s)

    tm = torch_model(args.workload)
    n_torch = sum(p.numel() for p in tm.parameters())
    if n_torch != n_jax:
        raise SystemExit(f"parameter counts differ: jax {n_jax:,} vs torch {n_torch:,}")
    tm.train()
    topt = torch.optim.Adam(tm.parameters(), lr=2e-4)
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())  # NCHW
    tt = torch.from_numpy(np.asarray(t).astype(np.int64))
    ttarget = torch.from_numpy(np.asarray(target).transpose(0, 3, 1, 2).copy())

    def torch_step():
        topt.zero_grad(set_to_none=True)
        out = tm(tx, tt).sample
        loss = torch.nn.functional.mse_loss(out, ttarget)
        loss.backward()
        topt.step()

    print(
        f"workload {args.workload}: {size}x{size}x{channels}, params {n_jax:,} (both), "
        f"batch {args.batch}, jax dtypes {dtypes} (params float32), torch float32"
    )
    for d, (_, flops, compile_s) in jax_steps.items():
        print(
            f"jax {d}: compile {compile_s:.1f} s, "
            f"model {flops / 1e9:.1f} GFLOP/step (direct convolutions)"
        )
    fns = [(f"jax {d}", fn) for d, (fn, _, _) in jax_steps.items()] + [
        ("torch float32", torch_step)
    ]
    for _ in range(args.warmup):
        for _, fn in fns:
            fn()
    times = {label: [] for label, _ in fns}
    faults = {label: [] for label, _ in fns}  # minor page faults: memory faulted in again
    for _ in range(args.runs):
        for label, fn in fns:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            s = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - s)
            faults[label].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    med = {label: statistics.median(v) for label, v in times.items()}
    mt = med["torch float32"]
    for label, v in times.items():
        line = f"{label:14s} step: median {med[label]:.3f} s, {args.batch / med[label]:7.1f} img/s"
        if label.startswith("jax"):
            flops = jax_steps[label.split()[1]][1]
            gfs = flops / med[label] / 1e9
            line += f", {gfs:5.0f} GFLOP/s, speedup vs torch {mt / med[label]:.2f}x"
        print(
            f"{line}  runs {[round(x, 3) for x in v]}, "
            f"page faults/step {statistics.median(faults[label]):.0f}"
        )
    print(f"peak RSS {peak_rss_mib():.0f} MiB (both frameworks in one process)")


if __name__ == "__main__":
    main()
