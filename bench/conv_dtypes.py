"""One U-Net convolution's forward + backward as GPUs and TPUs run it, per operand/result dtype,
with the kernels that ran.

``diffjax.kernels.conv.conv3x3_xla`` (XLA's convolution with the input and kernel gradients
written out, the
form the U-Net uses off the CPU) on whatever device JAX finds: its output, input gradient and
kernel gradient, for bfloat16 operands with float32 results, bfloat16 operands with bfloat16
results (``tuning.conv_result_in_compute_dtype`` on GPUs) and float32. Prints the median time of the
three convolutions after warm-up, their rate in TFLOP/s (3 x the direct convolution's FLOPs) and
the longest ops of a profiled call (``trace_summary.py``): cuDNN's kernel names carry the data
types its tensor cores ran (``bf16bf16_bf16f32`` vs ``f32f32_tf32f32``).

    python bench/conv_dtypes.py      # the CIFAR-10 U-Net's widest 32x32 and 16x16 layers
    python bench/conv_dtypes.py --shapes 2x8x8x4x4 --runs 2      # a tiny check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import environment, median_seconds  # noqa: E402
from trace_summary import summarize  # noqa: E402

from diffjax.kernels import conv as layers  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16

# name -> (operand dtype, result dtype; None: the operands')
VARIANTS = {
    "bf16 operands, f32 result": (BF16, F32),
    "bf16 operands, bf16 result": (BF16, None),
    "f32": (F32, F32),
}


def conv_and_grads(x, kernel, g, dtype, out):
    """Output, input gradient and kernel gradient of ``conv3x3_xla`` (stride 1)."""
    conv = lambda a, k: layers.conv3x3_xla(a, k, 1, dtype, 1, out)  # noqa: E731
    y, vjp = jax.vjp(conv, x.astype(dtype), kernel)
    return (y, *vjp(g.astype(y.dtype)))


def bench(shape: tuple[int, ...], runs: int, top: int) -> None:
    b, h, w, c, o = shape
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, h, w, c))  # [B, H, W, C]
    kernel = jax.random.normal(kk, (3, 3, c, o)) / (3 * c**0.5)  # [3, 3, C, O]
    g = jax.random.normal(kg, (b, h, w, o))  # [B, H, W, O]
    flops = 3 * 2 * b * h * w * c * o * 9  # forward, input gradient, kernel gradient
    for name, (dtype, out) in VARIANTS.items():
        fn = jax.jit(conv_and_grads, static_argnums=(3, 4))
        call = lambda fn=fn, dtype=dtype, out=out: jax.block_until_ready(  # noqa: E731
            fn(x, kernel, g, dtype, out)
        )
        med, _ = median_seconds(call, warmup=3, runs=runs)
        print(
            f"[{b}, {h}, {w}, {c}] -> {o}, {name}: {med * 1e3:.3f} ms, "
            f"{flops / med / 1e12:.3g} TFLOP/s",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as logdir:
            with jax.profiler.trace(logdir):
                for _ in range(3):
                    call()
            print("\n".join(summarize(logdir, 3, top).splitlines()[-top:]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shapes",
        default="128x32x32x128x128,128x16x16x256x256",
        help="comma-separated BxHxWxCxO (input [B, H, W, C], O output channels)",
    )
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--top", type=int, default=4, help="ops listed per variant")
    args = p.parse_args()
    shapes = []
    for spec in args.shapes.split(","):
        dims = spec.split("x")
        if len(dims) != 5 or not all(d.isdigit() and int(d) > 0 for d in dims):
            sys.exit(f"error: --shapes entry {spec!r} is not BxHxWxCxO with positive integers")
        shapes.append(tuple(int(d) for d in dims))
    print(environment(), flush=True)
    for shape in shapes:
        bench(shape, args.runs, args.top)


if __name__ == "__main__":
    main()
