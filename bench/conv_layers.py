"""Every convolution of a workload's U-Net, diffjax on XLA:CPU vs torch (oneDNN), fwd and bwd.

The convolutions are read from the model's jaxpr traced with direct convolutions (shape,
stride, how often each occurs), then each distinct one is timed alone as diffjax computes it in
float32 (``diffjax.kernels.conv.conv3x3_algorithm``: Winograd F(4x4, 3x3) or F(2x2, 3x3),
oneDNN or XLA's
``conv_general_dilated``, NHWC, compiled with ``cpu_runtime``'s float32 fusion types), forward
and its VJP (input + kernel gradient), against torch's ``nn.Conv2d`` (NCHW, float32) forward
and forward + backward, same threads. GFLOP/s count the direct convolution's FLOPs. The
weighted sum over the network says how much of a train step's gap to torch the convolutions
explain.

    python bench/conv_layers.py --workload small32 --batch 64
    python bench/conv_layers.py --workload cifar10 --batch 16
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see vs_torch.py

import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import (  # noqa: E402
    WORKLOADS,
    environment,
    make_model,
    median_seconds,
)

from diffjax.kernels import conv as layers  # noqa: E402
from diffjax.kernels import cpu_runtime  # noqa: E402
from diffjax.models import init_params  # noqa: E402


def conv_shapes(name: str, batch: int) -> collections.Counter:
    """(input [B, H, W, C], kernel [kh, kw, C, O], stride) -> occurrences in one forward pass."""
    model, size, channels = make_model(name, kernels="plain")  # every 3x3 convolution direct
    params = init_params(model, jax.random.key(0), size, channels)
    x = jnp.zeros((batch, size, size, channels))
    t = jnp.zeros((batch,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, train=False))(params)
    found = collections.Counter()

    def visit(jpr):
        for eqn in jpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
                found[(tuple(lhs), tuple(rhs), tuple(eqn.params["window_strides"]))] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return found


def time_conv(xs: tuple, ks: tuple, strides: tuple, runs: int) -> tuple:
    """Algorithm, FLOPs, then seconds of: diffjax forward, diffjax VJP, torch forward, torch
    forward + backward."""
    import torch

    b, h, w, c = xs
    kh, kw, _, o = ks
    sh, sw = strides
    oh, ow = -(-h // sh), -(-w // sw)
    flops = 2.0 * b * oh * ow * kh * kw * c * o

    algorithm = layers.conv3x3_algorithm(xs, o, sh, jnp.float32, "cpu", False)

    def conv(x, k):
        return layers._CONV3X3[algorithm](x, k, sh, jnp.float32, "cpu", False)

    x = jax.random.normal(jax.random.key(0), xs)
    k = jax.random.normal(jax.random.key(1), ks) * 0.05
    g = jax.random.normal(jax.random.key(2), (b, oh, ow, o))
    options = cpu_runtime.compiler_options("float32")
    fwd = jax.jit(conv, compiler_options=options)
    bwd = jax.jit(lambda x, k, g: jax.vjp(conv, x, k)[1](g), compiler_options=options)
    jf = median_seconds(lambda: fwd(x, k).block_until_ready(), 2, runs)[0]
    jb = median_seconds(lambda: jax.block_until_ready(bwd(x, k, g)), 2, runs)[0]

    # torch: NCHW; SAME padding, stride 2 pads (0, 1) as TF / the DDPM model.
    tconv = torch.nn.Conv2d(c, o, (kh, kw), stride=strides, padding=0)
    pad = (kw // 2, kw // 2, kh // 2, kh // 2) if sh == 1 else (0, 1, 0, 1)
    tx = torch.randn(b, c, h, w, requires_grad=True)
    tg = torch.randn(b, o, oh, ow)

    def tfwd():
        with torch.no_grad():
            tconv(torch.nn.functional.pad(tx, pad))

    def tfb():
        tconv(torch.nn.functional.pad(tx, pad)).backward(tg)

    tf, tfb_s = median_seconds(tfwd, 2, runs)[0], median_seconds(tfb, 2, runs)[0]
    return algorithm, flops, jf, jb, tf, tfb_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="small32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(environment())
    tot = collections.Counter()
    print(
        f"{'input BxHxWxC':>18s} {'kernel':>12s} {'s':>1s} {'n':>2s} {'GFLOP':>6s} "
        f"{'algorithm':>9s} | {'fwd':>5s} {'torch fwd':>9s} | {'f+b':>5s} {'torch f+b':>9s}"
        "   (GFLOP/s)"
    )
    for (xs, ks, strides), n in sorted(conv_shapes(args.workload, args.batch).items()):
        algorithm, flops, jf, jb, tf, tfb_s = time_conv(xs, ks, strides, args.runs)
        sh = strides[0]
        tot["diffjax"] += n * (jf + jb)
        tot["torch"] += n * tfb_s
        print(
            f"{'x'.join(map(str, xs)):>18s} {'x'.join(map(str, ks)):>12s} {sh:1d} {n:2d} "
            f"{flops / 1e9:6.2f} {algorithm:>9s} | "
            f"{flops / jf / 1e9:5.0f} {flops / tf / 1e9:9.0f} | "
            f"{3 * flops / (jf + jb) / 1e9:5.0f} {3 * flops / tfb_s / 1e9:9.0f}",
            flush=True,
        )
    print(
        f"all convolutions of one train step (forward + backward): diffjax "
        f"{tot['diffjax']:.3f} s, torch {tot['torch']:.3f} s, torch/diffjax "
        f"{tot['torch'] / tot['diffjax']:.2f}x"
    )


if __name__ == "__main__":
    main()
