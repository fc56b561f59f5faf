"""Shared pieces of the benchmarks: workloads, the JAX train step, timing and environment info."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from importlib import metadata

import jax
import jax.numpy as jnp
import optax
import ynn_isa

from diffjax import kernels
from diffjax.kernels import cpu_runtime
from diffjax.models.unet import UNet

# Before any JAX computation, as train.py does (diffjax/kernels/cpu_runtime.py). The YNNPACK
# fusion types are chosen per program (``compiler_options`` in make_train_step), since a
# benchmark may time both dtypes. Two A/B knobs of the benchmarks only (the library reads
# neither): DIFFJAX_REUSE_FREED_MEMORY=0 measures without malloc reuse (for JAX and torch
# alike), DIFFJAX_YNN_FUSIONS=0 with XLA's default fusions.
REUSE_FREED_MEMORY = cpu_runtime.env_enabled("DIFFJAX_REUSE_FREED_MEMORY") and (
    cpu_runtime.reuse_freed_memory()
)
YNN_FUSIONS = cpu_runtime.env_enabled("DIFFJAX_YNN_FUSIONS")
# DIFFJAX_BENCH_YNN_ISA=AVX2 holds YNNPACK to its AVX2 kernels (ynn_isa.py), before any kernel
# is chosen: with --xla_cpu_max_isa=AVX2 and ONEDNN_MAX_CPU_ISA=AVX2 every library of jaxlib
# then runs what it runs on an AVX2-only CPU.
try:
    YNN_HOLD = ynn_isa.hold_from_env()
except ynn_isa.HoldError as e:
    raise SystemExit(f"error: {e}") from None

# name -> (UNet fields, image size, channels). FLOPs per image are taken from XLA's cost analysis.
WORKLOADS = {
    # Default model of configs/digits.py: 8x8x1 images, no dropout (1.0M parameters).
    "digits": (
        dict(
            ch=32,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(4,),
            dropout=0.0,
            out_channels=1,
            num_groups=8,
        ),
        8,
        1,
    ),
    # Small 32x32x1 model (1.6M parameters).
    "small32": (
        dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), out_channels=1),
        32,
        1,
    ),
    # Ho et al. 2020 CIFAR-10 model (35.7M parameters).
    "cifar10": (dict(), 32, 3),
}

# Nominal fp32 peak of the 2-core machine the README numbers come from (AVX-512 FMA).
FP32_PEAK_GFLOPS = 166.0


def make_model(name: str, dtype=jnp.float32, kernels: str = "tuned") -> tuple[UNet, int, int]:
    fields, size, channels = WORKLOADS[name]
    return UNet(**fields, dtype=dtype, kernels=kernels), size, channels


def compiler_options(model: UNet, xla_options: dict[str, str] | None = None) -> dict[str, str]:
    """The per-program XLA options of ``model``'s programs: ``cpu_runtime``'s fusion types for
    its compute dtype (none with DIFFJAX_YNN_FUSIONS=0), updated with ``xla_options`` (an A/B's)."""
    options = (
        cpu_runtime.compiler_options(jnp.dtype(model.dtype).name, model.kernels)
        if YNN_FUSIONS
        else {}
    )
    return {**options, **(xla_options or {})}


def make_train_step(
    model: UNet, lr: float = 2e-4, xla_options: dict[str, str] | None = None
) -> tuple[Callable, optax.GradientTransformation]:
    """Jitted train step: forward + MSE to the target + backward + Adam update (params donated),
    compiled with ``compiler_options(model, xla_options)``."""
    opt = optax.adam(lr)

    def loss_fn(params, x, t, target, rng):
        out = model.apply({"params": params}, x, t, train=True, rngs={"dropout": rng})
        return jnp.mean(jnp.square(out - target))

    def step(params, opt_state, x, t, target, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, t, target, rng)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    options = compiler_options(model, xla_options)
    return jax.jit(step, donate_argnums=(0, 1), compiler_options=options), opt


def make_inputs(batch: int, size: int, channels: int, seed: int = 0):
    kx, kt, kn = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, size, size, channels))  # [B, H, W, C]
    t = jax.random.randint(kt, (batch,), 0, 1000, jnp.int32)
    target = jax.random.normal(kn, (batch, size, size, channels))
    return x, t, target


def median_seconds(fn: Callable[[], object], warmup: int, runs: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def matmul_gflops(n: int = 2048, runs: int = 9) -> float:
    """The machine's measured float32 matmul rate: jnp.dot of two n x n matrices, median."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    dot = jax.jit(jnp.dot)
    med, _ = median_seconds(lambda: dot(a, a).block_until_ready(), warmup=2, runs=runs)
    return 2.0 * n**3 / med / 1e9


def flops_of(compiled) -> float:
    """FLOPs of one call of a compiled program, from XLA's cost analysis (0 if unavailable)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def model_flops(model: UNet, *args) -> float:
    """FLOPs of one ``make_train_step(model)`` call on ``args`` as the model defines them.

    XLA's cost analysis of the step traced with the plain kernels (direct 3x3 convolutions):
    the Winograd layers compute the same convolutions with 2.25x fewer multiplications, and
    rates are reported in the model's FLOPs so that they compare with torch's and across
    versions.
    (The lowered program's count is within 0.3% of the compiled one's.)
    """
    # Lowered for the CPU, whatever the default device: accelerator plugins (PJRT C API) do not
    # implement cost analysis before compilation, and the count is the program's, not the
    # device's.
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args)
    step, _ = make_train_step(model.clone(kernels="plain"))
    cost = step.lower(*abstract).cost_analysis()
    return float(cost.get("flops", 0.0)) if cost else 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def environment(kernels_name: str = "tuned") -> str:
    """Device, versions, settings and the CPU kernels of ``kernels_name`` (model.kernels)."""

    def ver(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    pkgs = ", ".join(
        f"{p} {ver(p)}" for p in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers")
    )
    return (
        f"device: {jax.devices()[0].device_kind} ({cpu_runtime.describe_cpu()})\n"
        f"versions: {pkgs}\n"
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')!r}, "
        f"malloc reuses freed memory: {'yes' if REUSE_FREED_MEMORY else 'no'}, "
        f"YNNPACK fusions: {'diffjax' if YNN_FUSIONS else 'XLA default'}, "
        f"YNNPACK ISA: {YNN_HOLD or 'this CPU'}\n"
        f"float32 {kernels.describe(kernels_name, 'float32')}\n"
        f"bfloat16 {kernels.describe(kernels_name, 'bfloat16')}"
    )
