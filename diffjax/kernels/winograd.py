"""3x3 convolutions by Winograd F(2x2, 3x3) and F(4x4, 3x3), for XLA:CPU: 2.25x and 4x fewer
multiplications.

``conv3x3_winograd`` computes a SAME stride-1 3x3 convolution as (m + 2)^2 independent matrix
products between transformed input tiles and transformed kernels (Lavin & Gray 2016; one batched
product, on oneDNN where asked for and supported), with a custom VJP whose transposed transforms
are written out; ``winograd_tile`` says which output tile m (2, 4, or none) beats the other
algorithms in a train step (thresholds: ``diffjax.kernels.tuning``). ``diffjax.kernels.conv``
picks the algorithm per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffjax.kernels import onednn as dnn
from diffjax.kernels.primitives import F32, pad1
from diffjax.kernels.tuning import TUNING

# Winograd F(m x m, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks",
# eq. 8): every (m + 2)^2 input tile d (stride m) gives an m x m output tile
#     Y = A^T [(G g G^T) * (B^T d B)] A,
# so a 3x3 convolution becomes (m + 2)^2 independent [N, C] x [C, O] products (N = B H W / m^2):
# (m + 2)^2 / m^2 multiplications per output instead of 9, plus transforms that add and scale.
# Every matrix is applied as additions along one axis at a time (as einsums with small matrices
# XLA:CPU ran them as slow products with 3- to 6-long rows).
#
# F(2x2, 3x3): B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
# G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]], A^T = [[1, 1, 1, 0],
# [0, 1, -1, -1]]: weights +-1, +-1/2, exact in binary.
#
# F(4x4, 3x3) (Lavin & Gray section 4.2, interpolation points 0, +-1, +-2):
# B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
#        [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
# G = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6], [1/24, -1/12, 1/6],
#      [0, 0, 1]],
# A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]].
# Its larger weights cost accuracy: float32 results are ~1e-6 of the largest value off (F(2x2):
# ~2e-7), but bfloat16 operands give ~2.6e-2 relative error (F(2x2): ~4.3e-3), so bfloat16
# compute keeps F(2x2, 3x3) (``winograd_tile``).


def _shifted(a: jax.Array, axis: int, lo: int) -> jax.Array:
    """n -> n + 1 entries along ``axis``: a zero before (lo=1) or after (lo=0)."""
    widths = [(0, 0)] * a.ndim
    widths[axis] = (lo, 1 - lo)
    return jnp.pad(a, widths)


def _phases(x: jax.Array, axis: int, m: int) -> tuple[list[jax.Array], int]:
    """Split ``axis`` (m n + 2 entries, padded to m (n + 1)) into its m phases of n + 1 entries;
    entry k of the window at offset m i is phase k (or k - m of window i + 1) at i."""
    n = (x.shape[axis] - 2) // m
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, m * (n + 1) - x.shape[axis])
    p = jnp.pad(x, widths).reshape(*x.shape[:axis], n + 1, m, *x.shape[axis + 1 :])
    return [jax.lax.index_in_dim(p, k, axis + 1, keepdims=False) for k in range(m)], n


def _interleave(phases: list[jax.Array], axis: int) -> jax.Array:
    """Inverse of ``_phases`` (without its padding): m arrays of n + 1 entries -> m n + 2."""
    x = jnp.stack(phases, axis + 1)  # [..., n + 1, m, ...]
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, x.shape[axis] - len(phases) + 2, axis=axis)


def _tile_rows2(x: jax.Array, axis: int) -> jax.Array:
    """F(2x2)'s B^T along ``axis`` (2n + 2 entries, padded) on the 4-wide windows at even
    offsets: [4, ...] with n entries there, rows d0 - d2, d1 + d2, d2 - d1, d1 - d3."""
    (even, odd), n = _phases(x, axis, 2)
    e0, e1 = (jax.lax.slice_in_dim(even, s, s + n, axis=axis) for s in (0, 1))  # d0, d2
    o0, o1 = (jax.lax.slice_in_dim(odd, s, s + n, axis=axis) for s in (0, 1))  # d1, d3
    return jnp.stack([e0 - e1, o0 + e1, e1 - o0, o0 - o1])


def _untile_rows2(t: jax.Array, axis: int) -> jax.Array:
    """Transpose of ``_tile_rows2``: [4, ...] with n windows along ``axis`` + 1 -> 2n + 2.

    Entry k of window i sits at 2i + k and receives column k of B^T applied to the window's four
    rows: k=0: t0, k=1: t1 - t2 + t3, k=2: t1 + t2 - t0, k=3: -t3. Even entries 2j collect k=0
    of window j and k=2 of window j - 1; odd entries likewise k=1 and k=3.
    """
    t0, t1, t2, t3 = t[0], t[1], t[2], t[3]
    even = _shifted(t0, axis, 0) + _shifted(t1 + t2 - t0, axis, 1)
    odd = _shifted(t1 - t2 + t3, axis, 0) - _shifted(t3, axis, 1)
    return _interleave([even, odd], axis)


def _tile_rows4(x: jax.Array, axis: int) -> jax.Array:
    """F(4x4)'s B^T along ``axis`` (4n + 2 entries, padded) on the 6-wide windows at offsets
    4i: [6, ...] with n entries there."""
    ph, n = _phases(x, axis, 4)
    d0, d1, d2, d3 = (jax.lax.slice_in_dim(p, 0, n, axis=axis) for p in ph)
    d4, d5 = (jax.lax.slice_in_dim(p, 1, n + 1, axis=axis) for p in ph[:2])
    return jnp.stack(
        [
            4 * d0 - 5 * d2 + d4,
            (d3 + d4) - 4 * (d1 + d2),
            4 * (d1 - d2) + (d4 - d3),
            2 * (d3 - d1) + (d4 - d2),
            2 * (d1 - d3) + (d4 - d2),
            4 * d1 - 5 * d3 + d5,
        ]
    )


def _untile_rows4(t: jax.Array, axis: int) -> jax.Array:
    """Transpose of ``_tile_rows4``: [6, ...] with n windows along ``axis`` + 1 -> 4n + 2.

    Entry k of window i sits at 4i + k and receives column k of B^T applied to the window's six
    rows; phase 0 collects k=0 of window j and k=4 of window j - 1, phase 1 k=1 and k=5.
    """
    t0, t1, t2, t3, t4, t5 = (t[i] for i in range(6))
    s34, d34 = t3 + t4, t3 - t4
    p0 = _shifted(4 * t0, axis, 0) + _shifted(t0 + t1 + t2 + s34, axis, 1)
    p1 = _shifted(4 * (t2 - t1 + t5) - 2 * d34, axis, 0) + _shifted(t5, axis, 1)
    p2 = _shifted(-5 * t0 - 4 * (t1 + t2) - s34, axis, 0)
    p3 = _shifted(t1 - t2 + 2 * d34 - 5 * t5, axis, 0)
    return _interleave([p0, p1, p2, p3], axis)


def _g_rows2(k: jax.Array) -> jax.Array:
    """F(2x2)'s G along the leading axis (3 taps -> 4)."""
    half = 0.5 * (k[0] + k[2])
    return jnp.stack([k[0], half + 0.5 * k[1], half - 0.5 * k[1], k[2]])


def _g_rows4(k: jax.Array) -> jax.Array:
    """F(4x4)'s G along the leading axis (3 taps -> 6)."""
    outer = k[0] + k[2]
    quarter = k[0] / 24 + k[2] / 6
    return jnp.stack(
        [
            k[0] / 4,
            -(outer + k[1]) / 6,
            -(outer - k[1]) / 6,
            quarter + k[1] / 12,
            quarter - k[1] / 12,
            k[2],
        ]
    )


def _a_rows2(q: list[jax.Array]) -> list[jax.Array]:
    """F(2x2)'s A^T: 4 transformed entries -> 2 outputs."""
    return [q[0] + q[1] + q[2], q[1] - q[2] - q[3]]


def _a_cols2(a: list[jax.Array]) -> list[jax.Array]:
    """A (the transpose of ``_a_rows2``): 2 output gradients -> 4."""
    return [a[0], a[0] + a[1], a[0] - a[1], -a[1]]


def _a_rows4(q: list[jax.Array]) -> list[jax.Array]:
    """F(4x4)'s A^T: 6 transformed entries -> 4 outputs."""
    s12, d12, s34, d34 = q[1] + q[2], q[1] - q[2], q[3] + q[4], q[3] - q[4]
    return [q[0] + s12 + s34, d12 + 2 * d34, s12 + 4 * s34, d12 + 8 * d34 + q[5]]


def _a_cols4(a: list[jax.Array]) -> list[jax.Array]:
    """A (the transpose of ``_a_rows4``): 4 output gradients -> 6."""
    e, f = a[0] + a[2], a[1] + a[3]
    e4, f8 = a[0] + 4 * a[2], 2 * a[1] + 8 * a[3]
    return [a[0], e + f, e - f, e4 + f8, e4 - f8, a[3]]


class _Transforms(NamedTuple):
    """F(m x m, 3x3) along one axis: B^T on windows and its transpose, G, A^T and A."""

    tile_rows: Callable[[jax.Array, int], jax.Array]
    untile_rows: Callable[[jax.Array, int], jax.Array]
    g_rows: Callable[[jax.Array], jax.Array]
    a_rows: Callable[[list[jax.Array]], list[jax.Array]]
    a_cols: Callable[[list[jax.Array]], list[jax.Array]]


# output tile side m -> its transforms
_TRANSFORMS = {
    2: _Transforms(_tile_rows2, _untile_rows2, _g_rows2, _a_rows2, _a_cols2),
    4: _Transforms(_tile_rows4, _untile_rows4, _g_rows4, _a_rows4, _a_cols4),
}

# The (m + 2)^2 transformed entries of a tile are ordered column-major, (column, row), in all
# three transforms: the order in which the input transform produces them, so nothing is
# transposed.


def winograd_input(x: jax.Array, m: int = 2) -> jax.Array:
    """[B, H, W, C] (H, W multiples of m) -> B^T d B of every tile: [(m + 2)^2, B H W / m^2, C].

    Summed in float32 and rounded once to x's dtype: bfloat16 sums would round each partial sum,
    and XLA:CPU computes every bfloat16 operation as a float32 one between two conversions.
    """
    tiles = _input_tiles(x, m)  # [m+2 (cols), m+2 (rows), B, H/m, W/m, C]
    return tiles.reshape((m + 2) ** 2, -1, x.shape[-1]).astype(x.dtype)


def winograd_input_by_channel(x: jax.Array, m: int = 2) -> jax.Array:
    """``winograd_input`` stored channel by channel: [(m + 2)^2, C, B H W / m^2]."""
    tiles = _input_tiles(x, m)  # [m+2 (cols), m+2 (rows), B, H/m, W/m, C]
    return jnp.moveaxis(tiles, -1, 2).reshape((m + 2) ** 2, x.shape[-1], -1).astype(x.dtype)


def _input_tiles(x: jax.Array, m: int) -> jax.Array:
    """B^T d B of every tile of [B, H, W, C], in float32:
    [m+2 (cols), m+2 (rows), B, H/m, W/m, C]."""
    f = _TRANSFORMS[m]
    rows = f.tile_rows(pad1(x.astype(F32)), 1)  # [m+2, B, H/m, W+2, C]
    return f.tile_rows(rows, 3)


def winograd_kernel(kernel: jax.Array, m: int = 2) -> jax.Array:
    """[3, 3, C, O] -> G g G^T: [(m + 2)^2, C, O] (float32), entries ordered (column, row)."""
    f = _TRANSFORMS[m]
    rows = f.g_rows(kernel.astype(F32))  # [m+2 (rows), 3, C, O]
    cols = f.g_rows(jnp.moveaxis(rows, 1, 0))  # [m+2 (cols), m+2 (rows), C, O]
    return cols.reshape((m + 2) ** 2, *kernel.shape[2:])


def winograd_output(p: jax.Array, shape: tuple[int, int, int], m: int = 2) -> jax.Array:
    """[(m + 2)^2, N, O] -> A^T p A per tile, as the image [B, H, W, O] (``shape`` = (B, H, W))."""
    b, h, w = shape
    f, t = _TRANSFORMS[m], m + 2
    p = p.reshape(t, t, b, h // m, w // m, p.shape[-1])  # [col, row, ...]
    r = f.a_rows([p[:, i] for i in range(t)])  # A^T over rows: m x [m+2 cols, ...]
    y = [f.a_rows([q[j] for j in range(t)]) for q in r]  # then over columns: [row][col]
    y = jnp.stack([jnp.stack(yr, 3) for yr in y], 2)  # [B, H/m, m, W/m, m, O]
    return y.reshape(b, h, w, -1)


def _output_transpose_phases(g: jax.Array, m: int) -> jax.Array:
    """``_output_transpose`` from the m^2 output phases at once: [t, t, B, H/m, W/m, O]."""
    b, h, w, o = g.shape
    f, t = _TRANSFORMS[m], m + 2
    phases = g.reshape(b, h // m, m, w // m, m, o)
    dy = [[phases[:, :, p, :, q] for q in range(m)] for p in range(m)]  # [row phase][col phase]
    rows = [f.a_cols([dy[p][q] for p in range(m)]) for q in range(m)]  # [col phase][row r]
    cols = [f.a_cols([rows[q][r] for q in range(m)]) for r in range(t)]  # [row r][col c]
    return jnp.stack([jnp.stack([cols[r][c] for r in range(t)]) for c in range(t)])  # [c, r, ...]


def _output_transpose_separable(g: jax.Array, m: int) -> jax.Array:
    """``_output_transpose`` one axis at a time, the rows' result materialised in between:
    [t, t, B, H/m, W/m, O]."""
    b, h, w, o = g.shape
    f = _TRANSFORMS[m]
    phases = g.reshape(b, h // m, m, w // m, m, o)
    rows = jnp.stack(f.a_cols([phases[:, :, p] for p in range(m)]))  # [t (r), B, H/m, W/m, m, O]
    return jnp.stack(f.a_cols([rows[..., q, :] for q in range(m)]))  # [t (c), t (r), ...]


# Output tile m -> how A g A^T is formed: F(4x4)'s 36 entries from all 16 phases at once make
# XLA:CPU copy out each phase first, so one axis at a time is faster there; F(2x2)'s 16 from 4
# phases are faster at once (bench/README.md, "Winograd F(4x4, 3x3)").
_OUTPUT_TRANSPOSE = {2: _output_transpose_phases, 4: _output_transpose_separable}


def _output_transpose(g: jax.Array, dtype: Any, m: int) -> jax.Array:
    """Transpose of ``winograd_output``: [B, H, W, O] -> A g A^T per tile, [(m + 2)^2, N, O]."""
    t = m + 2
    return _OUTPUT_TRANSPOSE[m](g, m).reshape(t * t, -1, g.shape[-1]).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _winograd(x: jax.Array, kernel: jax.Array, dtype: Any, m: int, onednn: bool) -> jax.Array:
    v = winograd_input(x, m)  # [(m+2)^2, N, C]
    u = winograd_kernel(kernel, m).astype(dtype)  # [(m+2)^2, C, O]
    return winograd_output(dnn.bmm(v, u, False, False, onednn), x.shape[:3], m)  # f32 [B, H, W, O]


def _winograd_fwd(x, kernel, dtype, m, onednn):
    return _winograd(x, kernel, dtype, m, onednn), (x, kernel)


def _kernel_grad_as_stored(x: jax.Array, dp: jax.Array, m: int, onednn: bool) -> jax.Array:
    """sum over tiles of v^T dp, v as the forward stores it ([t^2, N, C]): [t^2, C, O]."""
    return dnn.bmm(winograd_input(x, m), dp, True, False, onednn)


def _kernel_grad_by_channel(x: jax.Array, dp: jax.Array, m: int, onednn: bool) -> jax.Array:
    """The same from v stored by channel ([t^2, C, N]): a product with no transposed operand.

    The barrier keeps that layout: without it XLA folds the transpose back into the product,
    and XLA:CPU runs a transposed first operand on its own kernel instead of YNNPACK's.
    """
    vc = jax.lax.optimization_barrier(winograd_input_by_channel(x, m))  # [t^2, C, N]
    return dnn.bmm(vc, dp, False, False, onednn)


# Whether the kernel gradient reads the input stored by channel -> how it is formed.
_KERNEL_GRAD = {False: _kernel_grad_as_stored, True: _kernel_grad_by_channel}


def _winograd_bwd(dtype, m, onednn, res, g):
    x, kernel = res
    b, h, w, _ = x.shape
    t = m + 2
    # The transforms are linear: their transposes carry the gradient back (float32 sums).
    dp = _output_transpose(g.astype(F32), dtype, m)  # [t^2, N, O]
    u = winograd_kernel(kernel, m).astype(dtype)
    dv = dnn.bmm(dp, u, False, True, onednn)  # float32 [t^2, N, C]
    dv = dv.reshape(t, t, b, h // m, w // m, -1)  # [cols, rows, B, H/m, W/m, C]
    untile = _TRANSFORMS[m].untile_rows
    dxp = untile(untile(dv, 3), 1)  # [B, H + 2, W + 2, C], padded
    # The transformed input is recomputed (2.25-4x the input is not kept), in the layout the
    # library that runs the products takes fastest.
    library = "onednn" if dnn.bmm_on_onednn(x, dp, onednn) else "xla"
    by_channel = library in TUNING.winograd_grad_by_channel
    du = _KERNEL_GRAD[by_channel](x, dp, m, onednn)  # [t^2, C, O]
    kernel_transform = functools.partial(winograd_kernel, m=m)
    (dk,) = jax.linear_transpose(kernel_transform, jax.ShapeDtypeStruct(kernel.shape, F32))(du)
    return dxp[:, 1:-1, 1:-1].astype(x.dtype), dk


_winograd.defvjp(_winograd_fwd, _winograd_bwd)


def conv3x3_winograd(
    x: jax.Array, kernel: jax.Array, dtype: Any, m: int = 2, onednn: bool = False
) -> jax.Array:
    """3x3 SAME stride-1 convolution by Winograd F(m x m, 3x3), m in (2, 4); float32
    [B, H, W, O], H and W multiples of m; ``onednn``: its products on oneDNN where supported.

    Products take ``dtype`` operands (the transformed input and kernel) and accumulate in
    float32; the custom VJP's products likewise. Rounding: F(2x2)'s transforms add at most 4
    inputs and 9 kernel taps with weights +-1, +-1/2 (exact in binary), so float32 results
    differ from the direct form by a few ulps of the largest tile value (~2e-7 relative);
    F(4x4)'s weights (up to 25 on inputs, 1/6 and 1/24 on taps, 64 on outputs) give ~1e-6.
    """
    if m not in _TRANSFORMS or x.shape[1] % m or x.shape[2] % m:
        raise ValueError(
            f"Winograd output tile m={m} for a {x.shape[1]}x{x.shape[2]} map; allowed: m in "
            f"{sorted(_TRANSFORMS)} dividing the height and width"
        )
    return _winograd(x, kernel, dtype, m, onednn)


def use_winograd(shape: tuple[int, ...], features: int) -> bool:
    """Whether a stride-1 3x3 convolution of a [B, H, W, C] input may run as Winograd
    F(2x2, 3x3) (``tuning.TUNING``: from 16x16 maps, where the padded border and the transforms
    cost relatively less, with enough channels for the products to pay for the transforms),
    whether its products run on oneDNN or XLA."""
    _, h, w, c = shape
    return (
        min(h, w) >= TUNING.winograd_min_size
        and h % 2 == 0
        and w % 2 == 0
        and min(c, features) >= TUNING.winograd_min_channels
    )


def winograd_tile(shape: tuple[int, ...], features: int, dtype: Any) -> int:
    """Output tile m of the Winograd F(m x m, 3x3) that a stride-1 3x3 convolution of a
    [B, H, W, C] input in ``dtype`` compute runs as: 4, 2, or 0 (not Winograd).

    F(4x4, 3x3) only in float32 compute (bfloat16: see the accuracy note at the top) and where
    its products have enough rows to pay for the 36 C O entries of the transformed kernel.
    """
    b, h, w, c = shape
    if (
        jnp.dtype(dtype) in TUNING.winograd4_dtypes
        and h % 4 == 0
        and w % 4 == 0
        and min(h, w) >= TUNING.winograd4_min_size
        and b * h * w // 16 >= TUNING.winograd4_min_rows
        and min(c, features) >= TUNING.winograd_min_channels
    ):
        return 4
    return 2 if use_winograd(shape, features) else 0
