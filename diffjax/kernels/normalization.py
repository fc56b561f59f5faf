"""Group normalisation (Wu & He 2018) with a hand-written gradient, fast on XLA:CPU.

GroupNorm runs on every activation of the U-Net (twice per residual block), so its memory passes
count: written naively, XLA:CPU fuses the per-(sample, group) statistics into the full-size
elementwise loops and recomputes them per element through a [B, G] -> [B, C] expansion, whose
index arithmetic keeps the loop from vectorising (bench/README.md, "GroupNorm"). Here every
statistic reaches those loops as a per-(sample, channel) [B, C] array that XLA keeps
materialised (on the CPU ``_expand`` is a matrix product, which XLA does not fuse into its
consumers), so each full-size loop only broadcasts [B, C] operands. The
backward pass is the closed form (two reductions and one elementwise pass) instead of
autodiff's chain through the statistics.

Statistics and the arithmetic of the full-size loops are float32 whatever the compute dtype; the
variance is taken about a per-(sample, group) shift, so it does not cancel when |mean| >> std as
E[x^2] - E[x]^2 does. The swish that follows every GroupNorm in the U-Net is part of the same
loops (``swish=True``): one rounding to the compute dtype instead of two, and no separate
bfloat16 pass, whose every operation XLA:CPU computes between two conversions.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.kernels.primitives import F32
from diffjax.kernels.tuning import TUNING

__all__ = ["group_norm"]


def _expand_product(v: jax.Array, channels: int) -> jax.Array:
    """[..., G] per-group values -> [..., C], each channel taking its group's value.

    A product with the [G, C] 0/1 group-membership matrix (exact: one term per output) rather
    than a reshape: XLA:CPU keeps a product's result materialised, so the full-size loops that
    use it read a plain [B, C] array instead of recomputing the [B, G] -> [B, C] expansion per
    element. (0 x inf = nan: a non-finite statistic in one group spreads to the sample's other
    groups, where a reshape would keep it in its own.)
    """
    groups = v.shape[-1]
    member = np.kron(np.eye(groups, dtype=np.float32), np.ones((1, channels // groups), np.float32))
    return jnp.dot(v, member, precision=jax.lax.Precision.HIGHEST)


def _expand_repeat(v: jax.Array, channels: int) -> jax.Array:
    """``_expand_product`` as a repeat, which XLA:GPU fuses into its consumers; as a product
    each GroupNorm cost a kernel, and compiling them for the GPU (one matrix-product fusion
    each, tuned one by one) cost minutes."""
    return jnp.repeat(v, channels // v.shape[-1], axis=-1)


# Whether the platform is in ``TUNING.group_expand_by_product`` -> how statistics reach channels.
_EXPAND = {True: _expand_product, False: _expand_repeat}


def _expand(v: jax.Array, channels: int, platform: str) -> jax.Array:
    """[..., G] -> [..., C] (the channels of group g take v[..., g]), per platform."""
    return _EXPAND[platform in TUNING.group_expand_by_product](v, channels)


def _group_mean(v: jax.Array, groups: int) -> jax.Array:
    """[B, C] -> [B, G]: mean over each group's channels."""
    b, c = v.shape
    return jnp.mean(v.reshape(b, groups, c // groups), axis=-1)


def _statistics(
    xf: jax.Array, groups: int, epsilon: float, platform: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Shift s, mean - s and 1/sqrt(var + eps) of each (sample, group), per channel [B, C].

    Wu & He 2018 eq. 1-2: mean and variance over the pixels and channels of a group, for xf
    [B, HW, C]. The moments are taken about a shift s, one value of the group (its first
    channel's first pixel), so var = E[(x - s)^2] - E[x - s]^2 does not cancel when
    |mean| >> std, and mean - s is small and exact enough to use as it is.
    """
    hw, c = xf.shape[1], xf.shape[2]
    shift = _expand(jax.lax.stop_gradient(xf[:, 0, :: c // groups]), c, platform)  # [B, C]
    xs = xf - shift[:, None, :]  # [B, HW, C]
    m1 = _group_mean(jnp.sum(xs, axis=1) / hw, groups)  # [B, G]  E[x - s]
    m2 = _group_mean(jnp.sum(jnp.square(xs), axis=1) / hw, groups)  # E[(x - s)^2]
    inv = jax.lax.rsqrt(jnp.maximum(m2 - jnp.square(m1), 0.0) + epsilon)
    centre, inv = _expand(jnp.stack([m1, inv]), c, platform)  # [B, C] each
    return shift, centre, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    groups: int,
    epsilon: float,
    dtype: Any,
    swish: bool = False,
    platform: str = "cpu",
) -> jax.Array:
    """Group normalisation of x [B, ..., C] (Wu & He 2018 eq. 1-3), result in ``dtype``.

    y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias, with mean_g and var_g over the
    spatial positions and the C / groups channels of each (sample, group); scale and bias are
    float32 [C]; statistics and arithmetic are float32. ``swish``: return swish(y) = y
    sigmoid(y) (Ramachandran et al. 2017), which follows every GroupNorm of the DDPM U-Net,
    computed in the same float32 loop and rounded once; its gradient reuses the saved input
    instead of keeping y. ``platform``: the backend the program is for (how statistics are
    broadcast to channels).
    """
    return _group_norm_fwd(x, scale, bias, groups, epsilon, dtype, swish, platform)[0]


def _bcast(v: jax.Array, ndim: int) -> jax.Array:
    """[B, C] -> [B, 1, ..., 1, C] for an ndim-dimensional activation."""
    return v.reshape((v.shape[0],) + (1,) * (ndim - 2) + (v.shape[1],))


def _normalize(xs: jax.Array, scale, bias, centre, inv) -> jax.Array:
    """float32 y from the shifted input xs = x - s [B, ..., C] and [B, C] statistics.

    y = (x - s) a + (bias - (mean - s) a) with a = scale r: x - s is exact for x near s, unlike
    x a - mean a.
    """
    a = scale * inv  # [B, C]
    return xs * _bcast(a, xs.ndim) + _bcast(bias - centre * a, xs.ndim)


def _group_norm_fwd(x, scale, bias, groups, epsilon, dtype, swish, platform):
    b, c = x.shape[0], x.shape[-1]
    shift, centre, inv = _statistics(x.reshape(b, -1, c).astype(F32), groups, epsilon, platform)
    y = _normalize(x.astype(F32) - _bcast(shift, x.ndim), scale, bias, centre, inv)
    if swish:
        y = y * jax.nn.sigmoid(y)
    return y.astype(dtype), (x, scale, bias, shift, centre, inv)


def _group_norm_bwd(groups, epsilon, dtype, swish, platform, res, dy):
    """Closed-form gradient (as for batch norm, Ioffe & Szegedy 2015 sec. 3, per group).

    With xhat = (x - mean) r and g = dy * scale: dx = r (g - mean_G(g) - xhat mean_G(g xhat)),
    dscale = sum dy xhat, dbias = sum dy; mean_G is over the pixels and channels of a group.
    With ``swish``, dy is first multiplied by swish'(y) = s (1 + y (1 - s)), s = sigmoid(y), y
    recomputed from x.
    """
    x, scale, bias, shift, centre, inv = res
    b, c = x.shape[0], x.shape[-1]
    hw = x.size // (b * c)
    xs = x.reshape(b, hw, c).astype(F32) - shift[:, None, :]  # [B, HW, C]
    dyf = dy.reshape(b, hw, c).astype(F32)
    if swish:
        y = _normalize(xs, scale, bias, centre, inv)
        sig = jax.nn.sigmoid(y)
        dyf = dyf * sig * (1.0 + y * (1.0 - sig))
    sum_dy = jnp.sum(dyf, axis=1)  # [B, C]
    sum_dyx = jnp.sum(dyf * xs, axis=1) - centre * sum_dy  # [B, C]  sum dy (x - mean)
    dbias = jnp.sum(sum_dy, axis=0)
    dscale = jnp.sum(inv * sum_dyx, axis=0)
    # mean_G(g) and mean_G(g xhat), per channel.
    e1, e2 = _expand(
        jnp.stack([_group_mean(scale * sum_dy, groups), _group_mean(scale * inv * sum_dyx, groups)])
        / hw,
        c,
        platform,
    )
    # dx = dy (scale r) + (x - s) p + q, expanding xhat = ((x - s) - (mean - s)) r.
    p = -inv * inv * e2
    q = -inv * e1 - p * centre
    dx = dyf * (scale * inv)[:, None, :] + xs * p[:, None, :] + q[:, None, :]  # [B, HW, C]
    return dx.reshape(x.shape).astype(x.dtype), dscale, dbias


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)
