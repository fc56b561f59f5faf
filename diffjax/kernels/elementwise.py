"""Elementwise kernels: the per-sample bias of the timestep projection, and dropout masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffjax.kernels.primitives import F32, dot_f32
from diffjax.kernels.tuning import TUNING

__all__ = ["add_per_sample", "dropout_mask"]


def _pixel_sum_dot(g: jax.Array) -> jax.Array:
    """[B, H, W, C] -> float32 [B, C]: the sum over pixels as a product with a vector of ones
    (in a bfloat16 program XLA:CPU fuses the conversions around a reduction into one scalar
    loop)."""
    b, h, w, c = g.shape
    ones = jnp.ones((h * w,), g.dtype)
    return dot_f32(g.reshape(b, h * w, c), ones, (1,), (0,))


def _pixel_sum_reduce(g: jax.Array) -> jax.Array:
    return jnp.sum(g.astype(F32), (1, 2))


# By product where ``TUNING.pixel_sum_by_product`` says so -> the sum over pixels, float32 [B, C].
_PIXEL_SUM = {True: _pixel_sum_dot, False: _pixel_sum_reduce}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def add_per_sample(h: jax.Array, t: jax.Array, platform: str = "cpu") -> jax.Array:
    """h [B, H, W, C] + t [B, C] broadcast over pixels (e.g. the timestep projection, Ho et al.
    2020 appendix B); the gradient of t sums the cotangent over pixels in float32."""
    return h + t[:, None, None, :].astype(h.dtype)


def _add_per_sample_fwd(h, t, platform):
    return add_per_sample(h, t, platform), jnp.zeros((0,), t.dtype)  # only t's dtype is needed


def _add_per_sample_bwd(platform, t_like, g):
    by_product = (platform, g.dtype) in TUNING.pixel_sum_by_product
    return g, _PIXEL_SUM[by_product](g).astype(t_like.dtype)


add_per_sample.defvjp(_add_per_sample_fwd, _add_per_sample_bwd)


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijective hash with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean keep-mask with P(keep) = 1 - rate (to 2^-32), a pure function of ``key``.

    Bits are a counter-based hash of the element index keyed by 64 bits drawn from ``key``
    (two rounds of murmur3's finaliser, as in counter-based generators such as Philox/Threefry
    but lighter): one fused elementwise pass, where ``jax.random.bernoulli`` costs far more on
    CPU (threefry with a rolled loop). Adequate for dropout, not a general-purpose generator.
    """
    size = 1
    for d in shape:
        size *= d
    if size >= 2**32:
        raise ValueError(f"dropout on {size} elements; at most 2**32 - 1 supported")
    k = jax.random.bits(key, (2,), jnp.uint32)
    idx = jax.lax.iota(jnp.uint32, size).reshape(shape)
    bits = _fmix32(_fmix32(idx ^ k[0]) + k[1])
    return bits >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))
