"""The layers of the DDPM U-Net as plain Flax modules over the kernels of ``diffjax.kernels``.

Each layer holds its float32 parameters and computes in its compute ``dtype`` through the
operations of ``kernels.select(self.kernels)`` (``"tuned"`` by default, ``"plain"`` for the
``lax``/``jax.nn`` reference). Parameter names and shapes mirror ``flax.linen.Dense`` / ``Conv``
/ ``GroupNorm`` ("kernel", "bias"; "scale", "bias"), so parameter trees are interchangeable with
the flax layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax import kernels

F32 = jnp.float32

# Reference-model initialisers: variance_scaling(scale, "fan_avg", "uniform"), scale 1 or ~0.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros

__all__ = ["Conv3x3", "Dense", "Dropout", "GroupNorm", "default_init", "zero_init"]


class Dense(nn.Module):
    """y = x W + b over the last axis (also a 1x1 convolution on images); result in
    ``result_dtype`` (default: the compute ``dtype``)."""

    features: int
    dtype: Any = F32
    zero: bool = False
    kernels: str = "tuned"
    result_dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = zero_init if self.zero else default_init
        kernel = self.param("kernel", init, (x.shape[-1], self.features), F32)
        bias = self.param("bias", zero_init, (self.features,), F32)
        ops = kernels.select(self.kernels)
        y = ops.dense(x.astype(self.dtype), kernel, self.dtype) + bias  # float32 [..., features]
        return y.astype(self.result_dtype or self.dtype)


class Conv3x3(nn.Module):
    """3x3 convolution, SAME padding (stride 2 pads (0, 1) on even sides, as TF and diffusers)."""

    features: int
    dtype: Any = F32
    strides: int = 1
    zero: bool = False
    kernels: str = "tuned"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = zero_init if self.zero else default_init
        kernel = self.param("kernel", init, (3, 3, x.shape[-1], self.features), F32)
        bias = self.param("bias", zero_init, (self.features,), F32)
        ops = kernels.select(self.kernels)
        y = ops.conv3x3(x.astype(self.dtype), kernel, self.strides, self.dtype)
        return (y + bias).astype(self.dtype)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) with float32 ``scale`` and ``bias`` [C], statistics in
    float32; ``swish=True`` is the DDPM blocks' norm -> swish pair (Ho et al. 2020 appendix B),
    which the tuned kernels compute in one pass."""

    num_groups: int
    dtype: Any = F32
    epsilon: float = 1e-6
    swish: bool = False
    kernels: str = "tuned"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), F32)
        bias = self.param("bias", nn.initializers.zeros, (c,), F32)
        ops = kernels.select(self.kernels)
        return ops.group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype, self.swish)


class Dropout(nn.Module):
    """Inverted dropout (Srivastava et al. 2014); rng stream "dropout"."""

    rate: float
    kernels: str = "tuned"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = kernels.select(self.kernels).dropout_mask(
            self.make_rng("dropout"), x.shape, self.rate
        )
        return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - self.rate), x.dtype), 0).astype(x.dtype)
