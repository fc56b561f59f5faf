"""The plain kernels: every operation of the U-Net in ``lax`` / ``jax.nn`` as written in the
papers, differentiated by autodiff. The reference the tuned kernels are tested against, and the
path where nothing hand-written runs (``model.kernels="plain"``)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _acc(dtype: Any) -> Any:
    """Accumulation dtype: float32, or float64 for a float64 reference (``jax.enable_x64``)."""
    return jnp.promote_types(dtype, F32)


__all__ = ["add_per_sample", "attention", "conv3x3", "dense", "dropout_mask", "group_norm"]


def dense(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
    """x [..., K] @ kernel [K, N], operands in ``dtype``, float32 accumulation and result."""
    return jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=_acc(dtype))


def conv3x3(x: jax.Array, kernel: jax.Array, strides: int, dtype: Any) -> jax.Array:
    """3x3 SAME convolution (stride 2 pads (0, 1) on even sides), NHWC x HWIO, operands in
    ``dtype``, float32 result [B, H', W', O]."""
    return jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        (strides, strides),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=_acc(dtype),
    )


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    groups: int,
    epsilon: float,
    dtype: Any,
    swish: bool = False,
) -> jax.Array:
    """Group normalisation of x [B, ..., C] (Wu & He 2018 eq. 1-3) in float32, then swish
    (Ramachandran et al. 2017) if ``swish``; result in ``dtype``."""
    b, c = x.shape[0], x.shape[-1]
    xg = x.astype(_acc(dtype)).reshape(b, -1, groups, c // groups)  # [B, HW, G, C/G]
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.var(xg, axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape) * scale + bias
    return (jax.nn.swish(y) if swish else y).astype(dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, dtype: Any) -> jax.Array:
    """softmax(q k^T / sqrt(C)) v (Vaswani et al. 2017 eq. 1) for float32 q, k, v [B, N, C]:
    products in ``dtype`` with float32 accumulation, softmax in float32; [B, N, C] in dtype."""
    acc = _acc(dtype)
    logits = jnp.einsum(
        "bnc,bmc->bnm", q.astype(dtype), k.astype(dtype), preferred_element_type=acc
    ) / math.sqrt(q.shape[-1])
    p = jax.nn.softmax(logits, axis=-1)  # [B, N, N]
    out = jnp.einsum("bnm,bmc->bnc", p.astype(dtype), v.astype(dtype), preferred_element_type=acc)
    return out.astype(dtype)


def add_per_sample(h: jax.Array, t: jax.Array) -> jax.Array:
    """h [B, H, W, C] + t [B, C] broadcast over the pixels."""
    return h + t[:, None, None, :].astype(h.dtype)


def dropout_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean keep-mask, P(keep) = 1 - rate (``jax.random.bernoulli``)."""
    return jax.random.bernoulli(key, 1.0 - rate, shape)
