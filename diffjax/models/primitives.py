"""Primitives shared by the layer modules (``layers``, ``winograd``, ``onednn``, ``normalization``).

Every matrix product of the U-Net accumulates in float32 whatever its operand dtype (XLA:CPU's
fast bfloat16 kernels are bfloat16 x bfloat16 -> float32), and every 3x3 SAME stride-1
convolution pads its input by one pixel on each side.
"""

from __future__ import annotations

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


def xla_conv(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
    """XLA's SAME convolution, NHWC x HWIO -> NHWC, float32 accumulation and result."""
    dn = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), "SAME", dimension_numbers=dn, preferred_element_type=F32
    )
