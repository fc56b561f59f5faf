"""Primitives shared by the layer modules (``layers``, ``winograd``, ``onednn``, ``normalization``).

Every matrix product of the U-Net accumulates in float32 whatever its operand dtype (XLA:CPU's
fast bfloat16 kernels are bfloat16 x bfloat16 -> float32), and every 3x3 SAME stride-1
convolution pads its input by one pixel on each side. ``xla_conv``'s two gradients are written
out (``xla_conv_input_grad``, ``xla_conv_kernel_grad``) so that they take their operands in the
compute dtype: JAX's transpose rules upcast a bfloat16 operand to the float32 cotangent's dtype,
which turns every backward convolution of a bfloat16 program into a float32 one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32


def dot_f32(a: jax.Array, b: jax.Array, ca: tuple, cb: tuple, batch: bool = False) -> jax.Array:
    """dot_general contracting dims ``ca`` of a with ``cb`` of b (batch dim 0 if ``batch``),
    float32 accumulation and result."""
    bdims = ((0,), (0,)) if batch else ((), ())
    return jax.lax.dot_general(a, b, ((ca, cb), bdims), preferred_element_type=F32)


def pad1(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H + 2, W + 2, C], zeros around each image (3x3 SAME padding)."""
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def same_padding(n: int, strides: int) -> tuple[int, int]:
    """Zeros (before, after) a side of n pixels for a 3x3 SAME window: ceil(n / strides)
    outputs, the odd zero after (TensorFlow's and XLA's convention)."""
    total = max((-(-n // strides) - 1) * strides + 3 - n, 0)
    return total // 2, total - total // 2


def xla_conv(x: jax.Array, kernel: jax.Array, strides: int, out: Any = F32) -> jax.Array:
    """XLA's SAME convolution, NHWC x HWIO -> NHWC, result in ``out`` (None: the operands'
    dtype; the convolution libraries accumulate bfloat16 products in float32 either way)."""
    dn = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), "SAME", dimension_numbers=dn, preferred_element_type=out
    )


def xla_conv_input_grad(
    g: jax.Array, kernel: jax.Array, strides: int, size: tuple[int, int], out: Any = F32
) -> jax.Array:
    """dL/dx of ``xla_conv(x, kernel, strides)`` for x of spatial ``size`` (H, W), given the
    cotangent g [B, H', W', O]: g dilated by the stride and padded so that every input pixel
    meets the kernel taps that read it, convolved with the spatially flipped kernel [3, 3, C, O]
    (used as O -> C). g and kernel in one dtype; [B, H, W, C] in ``out`` (as ``xla_conv``)."""
    pads = []
    for n, m in zip(size, g.shape[1:3], strict=True):
        lo = 2 - same_padding(n, strides)[0]
        pads.append((lo, n + 1 - (m - 1) * strides - lo))  # (m - 1) s + 1 + lo + hi - 2 = n
    return jax.lax.conv_general_dilated(
        g,
        jnp.flip(kernel, (0, 1)),
        (1, 1),
        pads,
        lhs_dilation=(strides, strides),
        dimension_numbers=("NHWC", "HWOI", "NHWC"),
        preferred_element_type=out,
    )


def xla_conv_kernel_grad(x: jax.Array, g: jax.Array, strides: int, out: Any = F32) -> jax.Array:
    """dL/dkernel [3, 3, C, O] of ``xla_conv(x, kernel, strides)``, given the cotangent g
    [B, H', W', O]: dk[p, q, c, o] = sum over b, i, j of x_padded[b, s i + p, s j + q, c]
    g[b, i, j, o], a convolution of x (channels as its batch, images as its features) with g
    dilated by the stride. x and g in one dtype; result in ``out`` (as ``xla_conv``)."""
    pads = []
    for n, m in zip(x.shape[1:3], g.shape[1:3], strict=True):
        lo = same_padding(n, strides)[0]
        pads.append((lo, 3 + (m - 1) * strides - n - lo))  # n + lo + hi - (m - 1) s = 3
    return jax.lax.conv_general_dilated(
        x,
        g,
        (1, 1),
        pads,
        rhs_dilation=(strides, strides),
        dimension_numbers=("CHWN", "IHWO", "HWNC"),
        preferred_element_type=out,
    )
