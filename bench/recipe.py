"""A config's real training step and full-length sampling on whatever accelerator JAX finds.

Times the step ``train.py`` runs (``make_p_train_step``: the per-device ``train_step`` under
``jax.pmap``, with warm-up learning rate, gradient clipping and the EMA update; the state
donated) at the config's global batch, on device-resident synthetic batches (the input pipeline
is not timed), for each compute dtype: median images/s over --runs runs of --steps steps after
--warmup steps, the model's TFLOP/s (XLA's cost analysis with direct convolutions,
``common.model_flops``), the first step's time (its compile), peak device memory and the host's
time to dispatch a step (close to the step time: the host sets the pace). Then
ancestral sampling (Ho et al. 2020 Alg. 2, one ``lax.scan``) of --samples images x
--sample-steps steps from the EMA parameters, and the scan's overhead per step over a
dispatched forward at the same batch.

The DDPM recipe on one GPU (bench/README.md, "GPU")::

    python bench/recipe.py --config cifar10 --dtypes bfloat16,float32 --samples 256

``--profile DIR`` also traces a few steps per dtype and prints where their time goes
(``trace_summary.py``; the trace stays in DIR/<dtype> for TensorBoard or XProf).

A tiny run that checks the script on a CPU::

    python bench/recipe.py --config digits --batch 4 --steps 2 --runs 1 --samples 2 \
        --sample-steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from common import environment, make_inputs, median_seconds, model_flops, peak_rss_mib  # noqa: E402
from flax import jax_utils  # noqa: E402
from trace_summary import summarize  # noqa: E402

from diffjax.config.validation import load_config_file  # noqa: E402
from diffjax.core.sampling import make_model_fn, sample, space_timesteps  # noqa: E402
from diffjax.core.schedules import make_schedule  # noqa: E402
from diffjax.models import create_model  # noqa: E402
from diffjax.training.state import create_train_state  # noqa: E402
from diffjax.training.step import AXIS_NAME, make_p_train_step, per_device_batch_size  # noqa: E402


def load_config(name: str):
    """``configs/<name>.py``'s ``get_config()``."""
    path = os.path.join(ROOT, "configs", f"{name}.py")
    if not os.path.exists(path):
        known = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f[-3:] == ".py")
        sys.exit(f"error: --config {name!r} not found; allowed: {', '.join(known)}")
    return load_config_file(path)


def device_memory() -> str:
    """Peak memory of the first device (its allocator's high-water mark), else the process RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device peak"
    return f"{peak_rss_mib() / 1024:.2f} GiB peak RSS"


def bench_train(
    config,
    dtype: str,
    warmup: int,
    steps: int,
    runs: int,
    profile: str = "",
    profile_steps: int = 5,
) -> dict:
    config = config.copy_and_resolve_references()
    config.model.dtype = dtype
    model = create_model(config)
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    n_dev = jax.local_device_count()
    global_batch = int(config.training.batch_size)
    b = per_device_batch_size(global_batch, jax.process_count(), n_dev)
    size, channels = config.data.image_size, config.data.channels

    rng = jax.random.key(config.training.seed)
    state = create_train_state(config, model, rng)
    p_step = make_p_train_step(config, model, schedule, jax.random.fold_in(rng, 1))
    p_state = jax_utils.replicate(state, axis_name=AXIS_NAME)
    del state
    # Device-resident batches [devices, b, H, W, C] in [-1, 1]; two, alternated, so that no step
    # sees the previous step's input.
    shard = jax.pmap(lambda a: a, axis_name=AXIS_NAME)
    gen = np.random.default_rng(0)
    classes = max(int(config.model.num_classes or 0), 1)  # labels matter only when conditional
    batches = [
        {
            "image": shard(gen.uniform(-1, 1, (n_dev, b, size, size, channels)).astype("float32")),
            "label": shard(gen.integers(0, classes, (n_dev, b)).astype("int32")),
        }
        for _ in range(2)
    ]

    t0 = time.perf_counter()
    p_state, metrics = p_step(p_state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0

    dispatch = []  # seconds per timed run until the host had queued all its steps

    def run(n: int) -> None:
        nonlocal p_state
        if n <= 0:
            return
        last = None
        t0 = time.perf_counter()
        for i in range(n):
            p_state, last = p_step(p_state, batches[i % 2])
        dispatch.append(time.perf_counter() - t0)
        jax.block_until_ready((p_state, last))
        if not np.all(np.isfinite(np.asarray(last["loss"]))):
            raise RuntimeError(f"{dtype}: non-finite loss {last['loss']}")

    run(warmup)
    dispatch.clear()
    med, times = median_seconds(lambda: run(steps), warmup=0, runs=runs)
    # Asynchronous dispatch: a host that queues steps about as fast as they run (dispatch close
    # to the wall time) is what limits the step, not the device.
    dispatch_s = statistics.median(dispatch) / steps
    step_s = med / steps
    summary = ""
    if profile:
        logdir = os.path.join(profile, dtype)
        with jax.profiler.trace(logdir):
            t0 = time.perf_counter()
            run(profile_steps)
            wall = time.perf_counter() - t0
        summary = summarize(logdir, profile_steps, wall_s=wall)
    # The model's FLOPs per device: forward, MSE, backward and Adam at the per-device batch.
    params = jax.tree.map(lambda a: a[0], p_state.params)
    x, t, target = make_inputs(b, size, channels)
    opt_state = optax.adam(1e-4).init(params)
    flops = model_flops(model, params, opt_state, x, t, target, jax.random.key(0))
    return dict(
        dtype=dtype,
        batch=global_batch,
        step_s=step_s,
        img_s=global_batch / step_s,
        tflops=n_dev * flops / step_s / 1e12,
        compile_s=compile_s,
        runs=[round(v / steps * 1e3, 2) for v in times],
        dispatch_s=dispatch_s,
        memory=device_memory(),
        profile=summary,
    )


def bench_sampling(config, dtype: str, samples: int, sample_steps: int, runs: int) -> dict:
    config = config.copy_and_resolve_references()
    config.model.dtype = dtype
    model = create_model(config)
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    params = create_train_state(config, model, jax.random.key(0)).ema_params
    model_fn = make_model_fn(model, params)
    size, channels = config.data.image_size, config.data.channels
    shape = (samples, size, size, channels)
    T = schedule.num_timesteps
    steps = None if sample_steps == T else space_timesteps(T, sample_steps)

    fwd = jax.jit(model_fn)
    x = jax.random.normal(jax.random.key(1), shape)
    t_ = jnp.full((samples,), T // 2, jnp.int32)
    fwd_s, _ = median_seconds(lambda: fwd(x, t_).block_until_ready(), 2, 10)

    def draw(r):
        return sample(
            model_fn, schedule, r, shape, var_type=config.diffusion.var_type, timesteps=steps
        )

    rng = jax.random.key(2)
    t0 = time.perf_counter()
    compiled = jax.jit(draw).lower(rng).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        out = compiled(jax.random.fold_in(rng, i)).block_until_ready()
        times.append(time.perf_counter() - t0)
    if not bool(jnp.all(jnp.isfinite(out))):
        raise RuntimeError(f"{dtype}: non-finite samples")
    med = statistics.median(times)
    return dict(
        dtype=dtype,
        samples=samples,
        steps=sample_steps,
        wall_s=med,
        img_s=samples / med,
        overhead=med / sample_steps / fwd_s - 1.0,
        fwd_ms=fwd_s * 1e3,
        compile_s=compile_s,
        runs=[round(v, 2) for v in times],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cifar10", help="a configs/*.py name")
    p.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    p.add_argument(
        "--dtypes", default="bfloat16,float32", help="train-step compute dtypes ('': none)"
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per timed run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--samples", type=int, default=256, help="0: no sampling")
    p.add_argument("--sample-steps", type=int, default=1000)
    p.add_argument("--sample-dtype", default="bfloat16")
    p.add_argument("--sample-runs", type=int, default=2)
    p.add_argument(
        "--profile",
        default="",
        help="trace --profile-steps more train steps per dtype into PROFILE/<dtype> with "
        "jax.profiler and print where their time goes (bench/trace_summary.py)",
    )
    p.add_argument("--profile-steps", type=int, default=5)
    args = p.parse_args()
    dtypes = [d for d in args.dtypes.split(",") if d]  # empty: sampling only
    for d in dtypes + [args.sample_dtype]:
        if d not in ("float32", "bfloat16"):
            sys.exit(f"error: dtype {d!r} not allowed; allowed: float32, bfloat16")

    config = load_config(args.config)
    if args.batch:
        config.training.batch_size = args.batch
    print(environment(), flush=True)
    rows = []
    for dtype in dtypes:
        r = bench_train(
            config, dtype, args.warmup, args.steps, args.runs, args.profile, args.profile_steps
        )
        rows.append(r)
        print(
            f"train {args.config} {dtype}: batch {r['batch']}, {r['step_s'] * 1e3:.2f} ms/step, "
            f"{r['img_s']:.0f} img/s, {r['tflops']:.3g} TFLOP/s, first step (compile) "
            f"{r['compile_s']:.1f} s, "
            f"{r['memory']}, ms/step per run {r['runs']}, host dispatch "
            f"{r['dispatch_s'] * 1e3:.2f} ms/step",
            flush=True,
        )
        if r["profile"]:
            print(r["profile"], flush=True)
    if args.samples:
        s = bench_sampling(
            config, args.sample_dtype, args.samples, args.sample_steps, args.sample_runs
        )
        print(
            f"sample {args.config} {s['dtype']}: {s['samples']} samples x {s['steps']} steps in "
            f"{s['wall_s']:.2f} s ({s['img_s']:.1f} img/s, {s['wall_s'] / s['steps'] * 1e3:.2f} "
            f"ms/step), forward {s['fwd_ms']:.2f} ms, scan overhead {100 * s['overhead']:+.1f}% "
            f"of a forward, compile {s['compile_s']:.1f} s, runs {s['runs']}",
            flush=True,
        )
    print(f"device: {jax.devices()[0].device_kind}, {jax.local_device_count()} local device(s)")
    for r in rows:
        print(f"  {r['dtype']:9s} batch {r['batch']:4d}  {r['img_s']:9.0f} img/s")


if __name__ == "__main__":
    main()
