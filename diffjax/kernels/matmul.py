"""Matrix products of the tuned kernels, with float32 accumulation forward AND backward.

Every product takes its operands in the compute dtype and accumulates in float32
(``preferred_element_type``). JAX's transpose rules would run the backward products of a
bfloat16 product on float32 (upcast) operands, and XLA:CPU only uses its fast bfloat16 kernels
for bfloat16 x bfloat16 -> float32 products; hence the custom VJPs, which in float32 compute
exactly what autodiff would. ``onednn``: run the products on oneDNN (``onednn.bmm``) where this
process supports it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.kernels import onednn as dnn

__all__ = ["bmm_nn", "bmm_nt", "linear", "softmax"]


def _rows(a: jax.Array) -> jax.Array:
    """[..., K] -> [1, rows, K], the operand shape of ``onednn.bmm``."""
    return a.reshape(1, -1, a.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def linear(x: jax.Array, kernel: jax.Array, dtype: Any, onednn: bool = False) -> jax.Array:
    """x [..., K] (compute dtype) @ kernel [K, N] (float32, cast to dtype) -> float32 [..., N]."""
    return _linear_fwd(x, kernel, dtype, onednn)[0]


def _linear_fwd(x, kernel, dtype, onednn):
    # Products through onednn.bmm (oneDNN when asked for and supported, else XLA's dot): XLA:CPU
    # hands 2-D products to YNNPACK fusions that ran the 1x1 convolutions slowly.
    k = kernel.astype(dtype)
    y = dnn.bmm(_rows(x), k[None], False, False, onednn)[0]  # [rows, N]
    return y.reshape(*x.shape[:-1], k.shape[1]), (x, k)


def _linear_bwd(dtype, onednn, res, g):
    x, k = res
    g = g.astype(dtype)  # [..., N]
    dx = dnn.bmm(_rows(g), k[None], False, True, onednn)[0].reshape(x.shape).astype(x.dtype)
    # [K, N] float32: the parameter gradient keeps full precision.
    dk = dnn.bmm(_rows(x), _rows(g), True, False, onednn)[0]
    return dx, dk


linear.defvjp(_linear_fwd, _linear_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bmm_nt(a: jax.Array, b: jax.Array, onednn: bool = False) -> jax.Array:
    """a [B, N, K] @ b[B, M, K]^T -> float32 [B, N, M]."""
    return dnn.bmm(a, b, False, True, onednn)


def _bmm_nt_fwd(a, b, onednn):
    return bmm_nt(a, b, onednn), (a, b)


def _bmm_nt_bwd(onednn, res, g):
    a, b = res
    g = g.astype(a.dtype)  # [B, N, M]
    da = dnn.bmm(g, b, False, False, onednn)  # [B, N, K]
    db = dnn.bmm(g, a, True, False, onednn)  # [B, M, K]
    return da.astype(a.dtype), db.astype(b.dtype)


bmm_nt.defvjp(_bmm_nt_fwd, _bmm_nt_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bmm_nn(a: jax.Array, b: jax.Array, onednn: bool = False) -> jax.Array:
    """a [B, N, K] @ b [B, K, M] -> float32 [B, N, M]."""
    return dnn.bmm(a, b, False, False, onednn)


def _bmm_nn_fwd(a, b, onednn):
    return bmm_nn(a, b, onednn), (a, b)


def _bmm_nn_bwd(onednn, res, g):
    a, b = res
    g = g.astype(a.dtype)  # [B, N, M]
    da = dnn.bmm(g, b, False, True, onednn)  # [B, N, K]
    db = dnn.bmm(a, g, True, False, onednn)  # [B, K, M]
    return da.astype(a.dtype), db.astype(b.dtype)


bmm_nn.defvjp(_bmm_nn_fwd, _bmm_nn_bwd)


@jax.custom_vjp
def softmax(s: jax.Array) -> jax.Array:
    """softmax over the last axis of float32 logits s [..., M] (Vaswani et al. 2017 eq. 1).

    Its VJP is the closed form ds = p (g - sum_j g_j p_j), from the saved p: autodiff's chain
    through the max, the exponentials and the sum makes XLA:CPU materialise [..., M]-sized
    broadcasts of the row statistics; here the forward and the backward are one pass each.
    """
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))  # the VJP below is the whole gradient
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(s):
    p = softmax(s)
    return p, p


def _softmax_bwd(p, g):
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)
