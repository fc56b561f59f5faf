"""Batched float32 matrix products as the U-Net's train step runs them on the CPU: which library
XLA gives each form to, how fast it runs, and how many cores it keeps busy.

Each shape ``BxMxKxN`` is B independent [M, K] x [K, N] products, timed in three operand layouts
(``--forms``), jitted with the per-program options the float32 train step gets
(``cpu_runtime.compiler_options``):

* ``nn``: a [B, M, K] x b [B, K, N], both stored with the contraction where a product wants it
  (Winograd's products, attention's P v);
* ``nt``: a [B, M, K] x b [B, N, K] (attention's scores q k^T);
* ``tn``: a [B, K, M] x b [B, K, N], the first operand transposed (every kernel gradient:
  Winograd's, the dense layers', attention's dK and dV).

For each: median milliseconds, GFLOP/s (2 B M K N per call), the process's CPU time over wall
time while it ran (1.0: one core busy; up to the core count), and the library of the compiled
program (``YNNPACK``: an ``__ynn_fusion``; ``XLA``: XLA's own dot, on Eigen). The default shapes
are the small32 train step's at batch 64 (bench/README.md, "Where small32's time stays, and
why"), and two with long rows, which show how YNNPACK parallelises::

    python bench/products.py
    python bench/products.py --shapes 64x256x64x256 --forms nn,nt --runs 21
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import environment, median_seconds  # noqa: E402

from diffjax.kernels import cpu_runtime  # noqa: E402

# form -> (einsum of the stored operands, whether a and b are stored transposed)
FORMS = {
    "nn": ("bmk,bkn->bmn", False, False),
    "nt": ("bmk,bnk->bmn", False, True),
    "tn": ("bkm,bkn->bmn", True, False),
}
DEFAULT_SHAPES = (
    "64x256x64x256",  # attention scores at 16x16 (256 tokens), 64 channels
    "64x256x256x64",  # attention's P v
    "36x4096x32x32",  # F(4x4) Winograd, 32x32 maps, 32 channels
    "36x4096x64x64",  # F(4x4) Winograd, 32x32 maps, 64 channels
    "36x1024x64x64",  # F(4x4) Winograd, 16x16 maps
    "36x32x4096x32",  # the kernel gradients of those two (K: the tiles)
    "36x64x4096x64",
    "8x2048x64x256",  # long rows: YNNPACK splits them over the cores
    "1x16384x64x256",
)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"--shapes {text!r}: expected BxMxKxN of positive integers, e.g. 64x256x64x256"
        )
    b, m, k, n = (int(p) for p in parts)
    return b, m, k, n


def stored(a: jax.Array, b: jax.Array, form: str) -> tuple[jax.Array, jax.Array]:
    """a [B, M, K] and b [B, K, N] as ``form`` stores them."""
    _, transpose_a, transpose_b = FORMS[form]
    return (
        jnp.swapaxes(a, 1, 2) if transpose_a else a,
        jnp.swapaxes(b, 1, 2) if transpose_b else b,
    )


def product(a: jax.Array, b: jax.Array, form: str) -> jax.Array:
    """The B products [M, K] x [K, N] of operands stored as ``form``: [B, M, N]."""
    return jnp.einsum(FORMS[form][0], a, b)


def library(compiled) -> str:
    """Which library the compiled program runs its product on."""
    return "YNNPACK" if "__ynn_fusion" in compiled.as_text() else "XLA"


def time_form(shape: tuple[int, int, int, int], form: str, runs: int) -> dict:
    """Median ms, GFLOP/s, CPU/wall and library of one form of ``shape``'s products."""
    bsz, m, k, n = shape
    key_a, key_b = jax.random.split(jax.random.key(0))
    a, b = stored(
        jax.random.normal(key_a, (bsz, m, k)), jax.random.normal(key_b, (bsz, k, n)), form
    )
    options = cpu_runtime.compiler_options("float32")
    compiled = jax.jit(functools.partial(product, form=form)).lower(a, b).compile(options)
    compiled(a, b).block_until_ready()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    med, _ = median_seconds(lambda: compiled(a, b).block_until_ready(), warmup=0, runs=runs)
    busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    flops = 2.0 * np.prod(shape)
    return dict(ms=med * 1e3, gflops=flops / med / 1e9, busy=busy, library=library(compiled))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma list of BxMxKxN")
    p.add_argument("--forms", default="nn,nt,tn", help=f"comma list of {', '.join(FORMS)}")
    p.add_argument("--runs", type=int, default=11)
    args = p.parse_args()
    forms = args.forms.split(",")
    bad = [f for f in forms if f not in FORMS]
    if bad or args.runs < 1:
        p.error(
            f"--forms {','.join(bad)}: allowed {', '.join(FORMS)}"
            if bad
            else f"--runs {args.runs}: allowed >= 1"
        )
    try:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    except ValueError as e:
        p.error(str(e))
    print(environment())
    print(f"float32 batched products, median of {args.runs}; cores busy = CPU time / wall time")
    print("| B x M x K x N | form | ms | GFLOP/s | cores busy | library |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in shapes:
        for form in forms:
            r = time_form(shape, form, args.runs)
            print(
                f"| {'x'.join(map(str, shape))} | {form} | {r['ms']:.3f} | {r['gflops']:.1f} | "
                f"{r['busy']:.2f} | {r['library']} |"
            )


if __name__ == "__main__":
    main()
