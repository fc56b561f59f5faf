"""Float64 reference for the 3x3 convolution tests (Winograd, oneDNN) and their comparisons."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st


def same_pads(n: int, s: int) -> tuple[int, int]:
    """SAME padding (before, after) of a size-n axis for a 3-tap window at stride s."""
    total = max((-(-n // s) - 1) * s + 3 - n, 0)
    return total // 2, total - total // 2


def conv3x3_f64(x, w, s=1):
    """SAME 3x3 cross-correlation at stride s in float64 numpy, [B, H, W, C] x [3, 3, C, O] ->
    [B, H', W', O], and its adjoint g -> (dL/dx, dL/dw) for L = <conv(x, w), g>."""
    (ht, hb), (wl, wr) = same_pads(x.shape[1], s), same_pads(x.shape[2], s)
    xp = np.pad(x, ((0, 0), (ht, hb), (wl, wr), (0, 0)))
    ho, wo = -(-x.shape[1] // s), -(-x.shape[2] // s)

    def window(a, dy, dx):  # the inputs tap (dy, dx) meets: [B, Ho, Wo, C]
        return a[:, dy : dy + s * (ho - 1) + 1 : s, dx : dx + s * (wo - 1) + 1 : s]

    taps = [(i, j) for i in range(3) for j in range(3)]
    y = sum(np.einsum("bhwc,co->bhwo", window(xp, i, j), w[i, j]) for i, j in taps)

    def adjoint(g):
        dxp, dw = np.zeros_like(xp), np.zeros_like(w)
        for i, j in taps:
            window(dxp, i, j)[...] += np.einsum("bhwo,co->bhwc", g, w[i, j])
            dw[i, j] = np.einsum("bhwc,bhwo->co", window(xp, i, j), g)
        return dxp[:, ht : ht + x.shape[1], wl : wl + x.shape[2]], dw

    return y, adjoint


def conv_and_grads(conv, x, w, g) -> tuple:
    """(conv(x, w), dL/dx, dL/dw) for L = <conv(x, w), g>."""
    out, vjp = jax.vjp(conv, x, w)
    return (out, *vjp(g))


_BF16_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float32)


def assert_float32_conv_and_grads_match(results, want) -> None:
    """(y, dx, dw) against float64 ``want``, within 1e-4 of each one's largest value."""
    for got, ref in zip(results, want, strict=True):
        assert got.shape == ref.shape
        scale = float(np.max(np.abs(ref))) + 1e-12
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=1e-4 * scale)


def assert_conv_and_grads_match(
    float32_results, bfloat16_results, want, bfloat16_dtypes=_BF16_DTYPES
) -> None:
    """(y, dx, dw) in float32 and in bfloat16 compute against float64 ``want``.

    float32: each value sums <= 9 C (the kernel gradient: B H' W') O(1) products, so its error
    is ~1e-6 of the largest value; 1e-4 of it flags a wrong tap, sign, tile, padding side or
    stride (errors of O(1)). bfloat16 operands with float32 accumulation: relative error near
    bfloat16's 2^-9 (measured 3.5e-3 to 7e-3); 2e-2 flags a bfloat16 accumulation or a wrong
    tap. The input gradient comes back in the input's dtype, the others in float32 (or in
    ``bfloat16_dtypes``: a GPU convolution's result is bfloat16, one more rounding).
    """
    assert_float32_conv_and_grads_match(float32_results, want)
    assert [a.dtype for a in bfloat16_results] == list(bfloat16_dtypes)
    for got, ref in zip(bfloat16_results, want, strict=True):
        got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
        assert np.linalg.norm(got - ref) <= 2e-2 * np.linalg.norm(ref) + 1e-6


# Hypothesis arguments of ``float64_case``: odd and even sides, both strides.
CONV_CASES = dict(
    batch=st.integers(1, 3),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    channels=st.integers(1, 9),
    features=st.integers(1, 9),
    strides=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
)


def float64_case(batch, height, width, channels, features, strides, seed) -> tuple:
    """(x, w, g, (y, dL/dx, dL/dw)): float32 normal input, kernel and cotangent, and the
    float64 convolution and gradients they give (``conv3x3_f64``)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
    w = rng.normal(size=(3, 3, channels, features)).astype(np.float32)
    y, adjoint = conv3x3_f64(x.astype(np.float64), w.astype(np.float64), strides)
    g = rng.normal(size=y.shape).astype(np.float32)
    return x, w, g, (y, *adjoint(g.astype(np.float64)))
