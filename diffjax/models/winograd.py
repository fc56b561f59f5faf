"""3x3 convolutions by Winograd F(2x2, 3x3), for XLA:CPU: 2.25x fewer multiplications.

``conv3x3_winograd`` computes a SAME stride-1 3x3 convolution as 16 independent matrix products
between transformed input tiles and transformed kernels (Lavin & Gray 2016; one batched product,
on oneDNN where ``onednn.bmm`` can), with a custom VJP whose transposed transforms are written
out; ``use_winograd`` says where it beats the direct convolution in a train step
(``bench/README.md``). ``diffjax.models.layers.Conv3x3`` picks the algorithm per layer.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.models import onednn
from diffjax.models.primitives import F32, pad1

# Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks",
# eq. 8): every 4x4 input tile d (stride 2) gives a 2x2 output tile
#     Y = A^T [(G g G^T) * (B^T d B)] A,
# so a 3x3 convolution becomes 16 independent [N, C] x [C, O] products (N = B H W / 4), 2.25x fewer
# multiplications than the direct form, plus transforms that only add and subtract.
# B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]] and A^T = [[1, 1, 1, 0],
# [0, 1, -1, -1]] and G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]] are written
# out as additions below.


def _tile_rows(x: jax.Array, axis: int) -> jax.Array:
    """B^T applied along ``axis`` to the overlapping 4-wide windows at even offsets.

    ``x`` has 2n + 2 entries along ``axis`` (padded); returns [4, ...] with n entries there: rows
    d0 - d2, d1 + d2, d2 - d1, d1 - d3 of every window (even/odd phases, so no gather).
    """
    n = x.shape[axis] // 2 - 1
    phases = x.reshape(*x.shape[:axis], n + 1, 2, *x.shape[axis + 1 :])
    even = jax.lax.index_in_dim(phases, 0, axis + 1, keepdims=False)  # d0 of window i is even[i]
    odd = jax.lax.index_in_dim(phases, 1, axis + 1, keepdims=False)
    e0, e1 = (jax.lax.slice_in_dim(even, s, s + n, axis=axis) for s in (0, 1))  # d0, d2
    o0, o1 = (jax.lax.slice_in_dim(odd, s, s + n, axis=axis) for s in (0, 1))  # d1, d3
    return jnp.stack([e0 - e1, o0 + e1, e1 - o0, o0 - o1])


def _untile_rows(t: jax.Array, axis: int) -> jax.Array:
    """Transpose of ``_tile_rows``: [4, ...] with n windows along ``axis`` + 1 -> 2n + 2 entries.

    Entry k of window i sits at 2i + k and receives column k of B^T applied to the window's four
    rows: k=0: t0, k=1: t1 - t2 + t3, k=2: t1 + t2 - t0, k=3: -t3. Even entries 2j collect k=0
    of window j and k=2 of window j - 1; odd entries likewise k=1 and k=3.
    """
    t0, t1, t2, t3 = t[0], t[1], t[2], t[3]

    def shifted(a: jax.Array, lo: int) -> jax.Array:  # n -> n + 1 entries, offset by lo
        widths = [(0, 0)] * a.ndim
        widths[axis] = (lo, 1 - lo)
        return jnp.pad(a, widths)

    even = shifted(t0, 0) + shifted(t1 + t2 - t0, 1)
    odd = shifted(t1 - t2 + t3, 0) - shifted(t3, 1)
    x = jnp.stack([even, odd], axis + 1)  # [..., n + 1, 2, ...]
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])


# The 16 transformed entries of a tile are ordered column-major, (column, row), in all three
# transforms: the order in which the input transform produces them, so nothing is transposed.


def winograd_input(x: jax.Array) -> jax.Array:
    """[B, H, W, C] (H, W even) -> B^T d B of every tile: [16, B * H/2 * W/2, C], same dtype.

    Summed in float32 and rounded once: bfloat16 sums would round each partial sum, and XLA:CPU
    computes every bfloat16 operation as a float32 one between two conversions (small32
    bfloat16 step 0.953 -> 0.923 s).
    """
    b, h, w, c = x.shape
    xp = pad1(x.astype(F32))  # [B, H+2, W+2, C]
    rows = _tile_rows(xp, 1)  # [4, B, H/2, W+2, C]
    tiles = _tile_rows(rows, 3)  # [4 (cols), 4 (rows), B, H/2, W/2, C]
    return tiles.reshape(16, b * (h // 2) * (w // 2), c).astype(x.dtype)


def _g_rows(k: jax.Array) -> jax.Array:
    """G along the leading axis (3 taps -> 4): g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2."""
    half = 0.5 * (k[0] + k[2])
    return jnp.stack([k[0], half + 0.5 * k[1], half - 0.5 * k[1], k[2]])


def winograd_kernel(kernel: jax.Array) -> jax.Array:
    """[3, 3, C, O] -> G g G^T: [16, C, O] (float32), entries ordered (column, row).

    Written as additions: as an einsum with 3x4 matrices XLA:CPU ran it as a product with 3-long
    rows, 2-8 ms per CIFAR-10 kernel instead of a memory-bound pass.
    """
    rows = _g_rows(kernel.astype(F32))  # [4 (rows), 3, C, O]
    cols = _g_rows(jnp.moveaxis(rows, 1, 0))  # [4 (cols), 4 (rows), C, O]
    return cols.reshape(16, *kernel.shape[2:])


def winograd_output(m: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """[16, N, O] -> A^T m A per tile, as the image [B, H, W, O] (``shape`` = (B, H, W))."""
    b, h, w = shape
    m = m.reshape(4, 4, b, h // 2, w // 2, m.shape[-1])  # [col, row, ...]
    r = [m[:, 0] + m[:, 1] + m[:, 2], m[:, 1] - m[:, 2] - m[:, 3]]  # A^T over rows: [4 cols, ...]
    y = [[q[0] + q[1] + q[2], q[1] - q[2] - q[3]] for q in r]  # then over columns
    y = jnp.stack([jnp.stack(y[0], 3), jnp.stack(y[1], 3)], 2)  # [B, H/2, 2, W/2, 2, O]
    return y.reshape(b, h, w, -1)


def _output_transpose(g: jax.Array, dtype: Any) -> jax.Array:
    """Transpose of ``winograd_output``: [B, H, W, O] -> A g A^T per tile, [16, N, O] in dtype.

    A = [[1, 0], [1, 1], [1, -1], [0, -1]]: a 2-vector (a0, a1) maps to (a0, a0 + a1, a0 - a1,
    -a1), first over the rows of each 2x2 output tile, then over its columns.
    """
    b, h, w, o = g.shape
    phases = g.reshape(b, h // 2, 2, w // 2, 2, o)
    dy = [[phases[:, :, p, :, q] for q in (0, 1)] for p in (0, 1)]  # [row phase][col phase]

    def a_map(a0: jax.Array, a1: jax.Array) -> list[jax.Array]:
        return [a0, a0 + a1, a0 - a1, -a1]

    rows = [a_map(dy[0][q], dy[1][q]) for q in (0, 1)]  # [col phase][row r]
    cols = [a_map(rows[0][r], rows[1][r]) for r in range(4)]  # [row r][col c]
    m = jnp.stack([jnp.stack([cols[r][c] for r in range(4)]) for c in range(4)])  # [c, r, ...]
    return m.reshape(16, -1, o).astype(dtype)


def _winograd(x: jax.Array, u: jax.Array) -> jax.Array:
    v = winograd_input(x)  # [16, N, C]
    return winograd_output(onednn.bmm(v, u), x.shape[:3])  # f32 [B, H, W, O]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_winograd(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
    """3x3 SAME stride-1 convolution by Winograd F(2x2, 3x3); float32 [B, H, W, O], H and W even.

    Products take ``dtype`` operands (the transformed input and kernel) and accumulate in
    float32. Rounding: the transforms add at most 4 inputs and 9 kernel taps with weights
    +-1, +-1/2 (exact in binary), so float32 results differ from the direct form by a few ulps
    of the largest tile value (measured < 1e-6 relative).
    """
    return _winograd(x, winograd_kernel(kernel).astype(dtype))


def _winograd_fwd(x, kernel, dtype):
    return conv3x3_winograd(x, kernel, dtype), (x, kernel)


def _winograd_bwd(dtype, res, g):
    x, kernel = res
    b, h, w, _ = x.shape
    # The transforms are linear: their transposes carry the gradient back (float32 sums).
    dm = _output_transpose(g.astype(F32), dtype)  # [16, N, O]
    v = winograd_input(x)  # [16, N, C], recomputed: 4x the input is not kept between passes
    u = winograd_kernel(kernel).astype(dtype)
    dv = onednn.bmm(dm, u, transpose_b=True)  # float32 [16, N, C]
    dv = dv.reshape(4, 4, b, h // 2, w // 2, -1)  # [cols, rows, B, H/2, W/2, C]
    dxp = _untile_rows(_untile_rows(dv, 3), 1)  # [B, H + 2, W + 2, C], padded
    du = onednn.bmm(v, dm, transpose_a=True)  # [16, C, O]
    (dk,) = jax.linear_transpose(winograd_kernel, jax.ShapeDtypeStruct(kernel.shape, F32))(du)
    return dxp[:, 1:-1, 1:-1].astype(x.dtype), dk


conv3x3_winograd.defvjp(_winograd_fwd, _winograd_bwd)


# Where Winograd beats the direct convolution in the whole train step (bench/README.md): from
# 16x16 pixels up (the padded border and the transforms cost relatively more on smaller maps),
# with at least this many input and output channels, by whether its products run on oneDNN
# (``onednn.available()``): XLA's products are too thin at 32 channels to pay for the transforms
# (slower alone and in the step), oneDNN's are not (small32 step: 1.126 -> 1.063 s).
WINOGRAD_MIN_SIZE = 16
WINOGRAD_MIN_CHANNELS = {True: 32, False: 64}


def use_winograd(shape: tuple[int, ...], features: int, onednn_ok: bool | None = None) -> bool:
    """Whether a stride-1 3x3 convolution of a [B, H, W, C] input runs as Winograd F(2x2, 3x3);
    ``onednn_ok``: whether the products run on oneDNN (default: ``onednn.available()``)."""
    _, h, w, c = shape
    fast = onednn.available() if onednn_ok is None else onednn_ok
    return (
        min(h, w) >= WINOGRAD_MIN_SIZE
        and h % 2 == 0
        and w % 2 == 0
        and min(c, features) >= WINOGRAD_MIN_CHANNELS[fast]
    )
