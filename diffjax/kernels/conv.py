"""3x3 convolutions of the tuned kernels, and which algorithm each layer runs.

``conv3x3_algorithm`` picks, per layer shape, dtype and platform: Winograd F(4x4, 3x3) or
F(2x2, 3x3) (``diffjax.kernels.winograd``), oneDNN's convolution (``conv3x3_onednn``), nine
bfloat16 products (``conv3x3_dots``) or XLA's convolution (``conv3x3_xla``), by the thresholds
of ``diffjax.kernels.tuning``. GPUs and TPUs always get XLA's convolution, for which cuDNN and
the TPU compiler choose their own algorithms. Every variant's VJP takes the cotangent in the
compute dtype and returns the kernel gradient in float32.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.kernels import onednn as dnn
from diffjax.kernels import winograd
from diffjax.kernels.primitives import (
    F32,
    dot_f32,
    pad1,
    xla_conv,
    xla_conv_input_grad,
    xla_conv_kernel_grad,
)
from diffjax.kernels.tuning import TUNING

__all__ = [
    "conv3x3",
    "conv3x3_algorithm",
    "conv3x3_dots",
    "conv3x3_onednn",
    "conv3x3_xla",
    "kernel_grad_chunks",
]


def _conv3x3_dots(x: jax.Array, k: jax.Array) -> jax.Array:
    """SAME 3x3 convolution as nine shifted products: sum_{dy,dx} x[h+dy-1, w+dx-1] @ k[dy, dx]."""
    h, w = x.shape[1], x.shape[2]
    xp = pad1(x)  # [B, H+2, W+2, C]
    out = None
    for dy in range(3):
        for dx in range(3):
            shifted = xp[:, dy : dy + h, dx : dx + w, :]
            term = dot_f32(shifted, k[dy, dx], (3,), (0,))  # [B, H, W, O]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_dots(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
    """3x3 SAME stride-1 convolution from matrix products; float32 [B, H, W, O]."""
    return _conv3x3_dots(x, kernel.astype(dtype))


def _dots_fwd(x, kernel, dtype):
    k = kernel.astype(dtype)
    return _conv3x3_dots(x, k), (x, k)


def _dots_bwd(dtype, res, g):
    x, k = res
    g = g.astype(dtype)  # [B, H, W, O]
    # dL/dx is the convolution of g with the spatially flipped, in/out-transposed kernel.
    dx = _conv3x3_dots(g, jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)).astype(x.dtype)
    h, w = x.shape[1], x.shape[2]
    xp = pad1(x)
    dk = jnp.stack(
        [
            dot_f32(xp[:, dy : dy + h, dx_ : dx_ + w, :], g, (0, 1, 2), (0, 1, 2))  # [C, O]
            for dy in range(3)
            for dx_ in range(3)
        ]
    ).reshape(k.shape)
    return dx, dk


conv3x3_dots.defvjp(_dots_fwd, _dots_bwd)


def kernel_grad_chunks(batch: int, pixels: int) -> int:
    """How many equal batch chunks the kernel gradient is summed over (a divisor of batch):
    XLA:CPU's YNNPACK kernel-gradient convolution slows down per FLOP once the activations it
    contracts outgrow the caches."""
    n = min(
        TUNING.kernel_grad_max_chunks, max(1, batch * pixels // TUNING.kernel_grad_chunk_pixels)
    )
    while batch % n:
        n -= 1
    return n


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv3x3_xla(
    x: jax.Array, kernel: jax.Array, strides: int, dtype: Any, chunks: int = 1, out: Any = F32
) -> jax.Array:
    """XLA's 3x3 SAME convolution, [B, H', W', O] in ``out`` (None: the compute dtype), whose
    backward convolutions take the cotangent in the compute dtype, as the forward takes x and
    the kernel (autodiff would run them on float32 operands: ``primitives.xla_conv_input_grad``)
    and return ``out`` too, and whose kernel gradient is summed over ``chunks`` equal batch
    chunks (a divisor of B) in float32. In float32, exactly autodiff's gradients."""
    return xla_conv(x, kernel.astype(dtype), strides, out)


def _xla_conv_fwd(x, kernel, strides, dtype, chunks, out):
    return xla_conv(x, kernel.astype(dtype), strides, out), (x, kernel)


def _xla_kernel_grad(x, g, strides, chunks, out=F32):
    """float32 dL/dkernel from x and g [B, ...] (one dtype), summed over ``chunks``."""
    c = x.shape[0] // chunks
    parts = (
        xla_conv_kernel_grad(x[i * c : (i + 1) * c], g[i * c : (i + 1) * c], strides, out)
        for i in range(chunks)
    )
    return functools.reduce(jnp.add, (part.astype(F32) for part in parts))


def _xla_conv_bwd(strides, dtype, chunks, out, res, g):
    x, kernel = res
    g = g.astype(dtype)  # [B, H', W', O]
    dx = xla_conv_input_grad(g, kernel.astype(dtype), strides, x.shape[1:3], out)
    return dx.astype(x.dtype), _xla_kernel_grad(x, g, strides, chunks, out)


conv3x3_xla.defvjp(_xla_conv_fwd, _xla_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv3x3_onednn(
    x: jax.Array, kernel: jax.Array, strides: int, dtype: Any, chunks: int = 1
) -> jax.Array:
    """3x3 SAME convolution on oneDNN (``diffjax.kernels.onednn``; float32 [B, H', W', O]).

    The input gradient of a stride-1 convolution is oneDNN's convolution of g with the flipped,
    in/out-transposed kernel; a stride-2 one's, and every kernel gradient (not a small forward
    convolution), are XLA's, the latter summed over ``chunks`` equal batch chunks.
    """
    return dnn.conv3x3(x, kernel.astype(dtype), strides)


def _onednn_fwd(x, kernel, strides, dtype, chunks):
    return dnn.conv3x3(x, kernel.astype(dtype), strides), (x, kernel)


def _onednn_bwd(strides, dtype, chunks, res, g):
    x, kernel = res
    k = kernel.astype(dtype)
    if strides == 1:
        flipped = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)  # [3, 3, O, C]
        dx = dnn.conv3x3(g.astype(dtype), flipped, 1).astype(x.dtype)
    else:
        dx = xla_conv_input_grad(g, k.astype(F32), strides, x.shape[1:3]).astype(x.dtype)
    # float32 operands: XLA:CPU computes bfloat16 convolutions in float32 anyway.
    return dx, _xla_kernel_grad(x.astype(F32), g, strides, chunks)


conv3x3_onednn.defvjp(_onednn_fwd, _onednn_bwd)

# Winograd output tile (``winograd.winograd_tile``) -> algorithm
_WINOGRAD_ALGORITHM = {4: "winograd4", 2: "winograd"}


def conv3x3_algorithm(
    shape: tuple[int, ...],
    features: int,
    strides: int,
    dtype: Any,
    platform: str,
    onednn_ok: bool = False,
) -> str:
    """How a 3x3 convolution of a [B, H, W, C] input runs on ``platform``.

    "winograd4" / "winograd" (``winograd.conv3x3_winograd`` with 4x4 / 2x2 output tiles),
    "onednn" (``conv3x3_onednn``), "dots" (nine bfloat16 products, ``conv3x3_dots``) or "xla"
    (``conv3x3_xla``). All but the last are for XLA:CPU, "onednn" only where ``onednn_ok``
    (oneDNN asked for and supported for ``dtype``); GPUs and TPUs get XLA's convolution.
    """
    if platform != "cpu":
        return "xla"
    tile = winograd.winograd_tile(shape, features, dtype) if strides == 1 else 0
    if tile:
        return _WINOGRAD_ALGORITHM[tile]
    if onednn_ok:
        return "onednn"
    bf16 = jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
    if bf16 and strides == 1 and shape[-1] >= TUNING.bf16_dot_conv_min_channels:
        return "dots"
    return "xla"


def _chunks(x: jax.Array, dtype: Any, platform: str) -> int:
    # Chunked kernel gradients pay off under XLA's default YNNPACK convolutions (kept for
    # bfloat16 on CPU); float32 runs under cpu_runtime's fusions, where one call is faster.
    bf16 = jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
    cpu = platform == "cpu"
    return kernel_grad_chunks(x.shape[0], x.shape[1] * x.shape[2]) if bf16 and cpu else 1


def _xla_result(platform: str) -> Any:
    """dtype of XLA's convolution results: the compute dtype (None) where tuned so, else f32."""
    return None if platform in TUNING.conv_result_in_compute_dtype else F32


# algorithm -> (x, kernel, strides, dtype, platform, onednn_ok) -> [B, H', W', O]
_CONV3X3 = {
    "winograd4": lambda x, k, s, dtype, platform, dnn_ok: winograd.conv3x3_winograd(
        x, k, dtype, 4, dnn_ok
    ),
    "winograd": lambda x, k, s, dtype, platform, dnn_ok: winograd.conv3x3_winograd(
        x, k, dtype, 2, dnn_ok
    ),
    "onednn": lambda x, k, s, dtype, platform, dnn_ok: conv3x3_onednn(
        x, k, s, dtype, _chunks(x, dtype, platform)
    ),
    "dots": lambda x, k, s, dtype, platform, dnn_ok: conv3x3_dots(x, k, dtype),
    "xla": lambda x, k, s, dtype, platform, dnn_ok: conv3x3_xla(
        x, k, s, dtype, _chunks(x, dtype, platform), _xla_result(platform)
    ),
}


def conv3x3(
    x: jax.Array, kernel: jax.Array, strides: int, dtype: Any, platform: str, onednn: bool
) -> jax.Array:
    """3x3 SAME convolution of x [B, H, W, C] (compute dtype) with a float32 kernel [3, 3, C, O],
    by the algorithm ``conv3x3_algorithm`` picks; [B, H', W', O], float32 but on GPUs."""
    onednn_ok = onednn and dnn.supported(dtype)
    algorithm = conv3x3_algorithm(x.shape, kernel.shape[-1], strides, dtype, platform, onednn_ok)
    return _CONV3X3[algorithm](x, kernel, strides, dtype, platform, onednn_ok)
