"""The tuned kernels: the U-Net's operations with hand-written gradients and per-platform
algorithms, for speed on XLA:CPU (and what GPUs need: bfloat16 convolution results, fusible
GroupNorm statistics). Each function computes what its namesake in ``diffjax.kernels.plain``
computes (tests/test_kernels.py holds them to it); ``platform`` and ``onednn`` are bound once by
``diffjax.kernels.select``.
"""

from __future__ import annotations

from typing import Any

import jax

from diffjax.kernels import conv, elementwise, matmul, normalization

__all__ = ["add_per_sample", "attention", "conv3x3", "dense", "dropout_mask", "group_norm"]

dropout_mask = elementwise.dropout_mask


def dense(x: jax.Array, kernel: jax.Array, dtype: Any, *, onednn: bool = False) -> jax.Array:
    """x [..., K] @ kernel [K, N] (``matmul.linear``): float32 [..., N]."""
    return matmul.linear(x, kernel, dtype, onednn)


def conv3x3(
    x: jax.Array,
    kernel: jax.Array,
    strides: int,
    dtype: Any,
    *,
    platform: str = "cpu",
    onednn: bool = False,
) -> jax.Array:
    """3x3 SAME convolution by the algorithm ``conv.conv3x3_algorithm`` picks."""
    return conv.conv3x3(x, kernel, strides, dtype, platform, onednn)


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    groups: int,
    epsilon: float,
    dtype: Any,
    swish: bool = False,
    *,
    platform: str = "cpu",
) -> jax.Array:
    """``normalization.group_norm``: statistics and the swish in one float32 pass each way."""
    return normalization.group_norm(x, scale, bias, groups, epsilon, dtype, swish, platform)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, dtype: Any, *, onednn: bool = False
) -> jax.Array:
    """softmax(q k^T / sqrt(C)) v for float32 q, k, v [B, N, C]; [B, N, C] in ``dtype``.

    1/sqrt(C) scales q (in float32, before its one rounding to dtype) rather than the [B, N, N]
    logits: one pass fewer over the largest array of the block.
    """
    qs = (q * q.shape[-1] ** -0.5).astype(dtype)
    w = matmul.softmax(matmul.bmm_nt(qs, k.astype(dtype), onednn))  # [B, N, N] float32
    return matmul.bmm_nn(w.astype(dtype), v.astype(dtype), onednn).astype(dtype)


def add_per_sample(h: jax.Array, t: jax.Array, *, platform: str = "cpu") -> jax.Array:
    """h [B, H, W, C] + t [B, C] over the pixels (``elementwise.add_per_sample``)."""
    return elementwise.add_per_sample(h, t, platform)
