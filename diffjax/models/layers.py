"""Layers of the U-Net, written for speed on CPU (XLA) in float32 and bfloat16 compute.

Parameters are float32; activations use the compute dtype. Every matrix product takes its inputs
in the compute dtype and accumulates in float32 (``preferred_element_type``), forward AND
backward: JAX's default transpose rules would run the backward products of a bfloat16 product on
float32 (upcast) operands, and XLA:CPU only uses its fast bfloat16 kernels for bfloat16 x bfloat16
-> float32 products. Hence the custom VJPs below; in float32 they compute exactly what autodiff
would. On CPU, 3x3 convolutions with >= 32 channels (64 without oneDNN) on maps of >= 16x16
run as Winograd F(2x2, 3x3) (``diffjax.kernels.winograd``: 2.25x fewer multiplications), in
float32 as F(4x4, 3x3) (4x fewer; also on 8x8 maps with oneDNN) where its products have
>= 256 rows, and the others as XLA's convolutions (``conv3x3_xla``, whose kernel gradient in
bfloat16 compute is summed over cache-sized batch chunks), with XLA's products. Where a process
opts in to oneDNN on an AVX-512 CPU (``onednn.available``), the other convolutions, the
attention products and the dense layers' products run on oneDNN (``conv3x3_onednn``;
``diffjax.kernels.onednn``). GPUs and TPUs get XLA's ops:
``conv3x3_xla``, whose backward convolutions also take bfloat16 operands, and on GPUs gives
bfloat16 results in bfloat16 compute (``CONV_RESULT``).

Modules mirror flax.linen.Dense / Conv parameter names and shapes ("kernel", "bias"), so
parameter trees are interchangeable with the flax layers (GroupNorm: ``normalization.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.kernels import onednn, winograd
from diffjax.kernels.primitives import (
    F32,
    dot_f32,
    pad1,
    xla_conv,
    xla_conv_input_grad,
    xla_conv_kernel_grad,
)

# Reference-model initialisers: variance_scaling(scale, "fan_avg", "uniform"), scale 1 or ~0.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros

# bfloat16 3x3 convolutions with at least this many input channels run as nine bfloat16 matrix
# products: XLA:CPU computes bfloat16 convolutions in float32, but bfloat16 products natively.
# Below it the float32 convolution kernel is faster (products too small to pay for the slices).
BF16_DOT_CONV_MIN_CHANNELS = 128


def _rows(a: jax.Array) -> jax.Array:
    """[..., K] -> [1, rows, K], the operand shape of ``onednn.bmm``."""
    return a.reshape(1, -1, a.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
    """x [..., K] (compute dtype) @ kernel [K, N] (float32, cast to dtype) -> float32 [..., N]."""
    return _linear_fwd(x, kernel, dtype)[0]


def _linear_fwd(x, kernel, dtype):
    # The product and the input gradient on oneDNN too: XLA:CPU gives them to YNNPACK fusions,
    # which ran the small32 model's 1x1 convolutions and q/k/v/proj_out at 20-55 GFLOP/s
    # (small32 float32 step 0.909 -> 0.890 s; bench/README.md).
    k = kernel.astype(dtype)
    y = onednn.bmm(_rows(x), k[None], False, False)[0]  # [rows, N]
    return y.reshape(*x.shape[:-1], k.shape[1]), (x, k)


def _linear_bwd(dtype, res, g):
    x, k = res
    g = g.astype(dtype)  # [..., N]
    dx = onednn.bmm(_rows(g), k[None], False, True)[0].reshape(x.shape).astype(x.dtype)
    # [K, N] float32: the parameter gradient keeps full precision. A product contracting the
    # many rows of x and g, which oneDNN runs 2-4x faster than XLA:CPU (diffjax.kernels.onednn).
    dk = onednn.bmm(_rows(x), _rows(g), True, False)[0]
    return dx, dk


linear.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_vjp
def bmm_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [B, N, K] @ b[B, M, K]^T -> float32 [B, N, M]."""
    return onednn.bmm(a, b, False, True)


def _bmm_nt_fwd(a, b):
    return bmm_nt(a, b), (a, b)


def _bmm_nt_bwd(res, g):
    a, b = res
    g = g.astype(a.dtype)  # [B, N, M]
    da = onednn.bmm(g, b, False, False)  # [B, N, K]
    db = onednn.bmm(g, a, True, False)  # [B, M, K]
    return da.astype(a.dtype), db.astype(b.dtype)


bmm_nt.defvjp(_bmm_nt_fwd, _bmm_nt_bwd)


@jax.custom_vjp
def bmm_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [B, N, K] @ b [B, K, M] -> float32 [B, N, M]."""
    return onednn.bmm(a, b, False, False)


def _bmm_nn_fwd(a, b):
    return bmm_nn(a, b), (a, b)


def _bmm_nn_bwd(res, g):
    a, b = res
    g = g.astype(a.dtype)  # [B, N, M]
    da = onednn.bmm(g, b, False, True)  # [B, N, K]
    db = onednn.bmm(a, g, True, False)  # [B, K, M]
    return da.astype(a.dtype), db.astype(b.dtype)


bmm_nn.defvjp(_bmm_nn_fwd, _bmm_nn_bwd)


@jax.custom_vjp
def softmax(s: jax.Array) -> jax.Array:
    """softmax over the last axis of float32 logits s [..., M] (Vaswani et al. 2017 eq. 1).

    Its VJP is the closed form ds = p (g - sum_j g_j p_j), from the saved p. Autodiff's chain
    through the max, the exponentials and the sum makes XLA:CPU materialise [..., M]-sized
    broadcasts of the row statistics as inputs of its reduction fusions; here the forward and
    the backward are one fused pass each (small32 attention: bench/README.md).
    """
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))  # the VJP below is the whole gradient
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(s):
    p = softmax(s)
    return p, p


def _softmax_bwd(p, g):
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _pixel_sum_dot(g: jax.Array) -> jax.Array:
    """[B, H, W, C] -> float32 [B, C]: the sum over pixels as a product with a vector of ones."""
    b, h, w, c = g.shape
    ones = jnp.ones((h * w,), g.dtype)
    return dot_f32(g.reshape(b, h * w, c), ones, (1,), (0,))


# (platform, compute dtype) -> sum over pixels (float32 [B, C]); others: a float32 reduction.
# In a bfloat16 program XLA:CPU fuses the conversions around the reduction into one scalar loop
# (3.8 ms on [16, 32, 32, 128]; 0.1 ms as YNNPACK's reduction, 1.0 ms as a product); float32
# keeps YNNPACK's reduction, and GPUs fuse the reduction with its producers.
_PIXEL_SUM = {("cpu", jnp.dtype(jnp.bfloat16)): _pixel_sum_dot}


def _pixel_sum_reduce(g: jax.Array) -> jax.Array:
    return jnp.sum(g.astype(F32), (1, 2))


def _pixel_sum(g: jax.Array) -> jax.Array:
    return _PIXEL_SUM.get((jax.default_backend(), g.dtype), _pixel_sum_reduce)(g)


@jax.custom_vjp
def add_per_sample(h: jax.Array, t: jax.Array) -> jax.Array:
    """h [B, H, W, C] + t [B, C] broadcast over pixels (e.g. the timestep projection, Ho et al.
    2020 appendix B); the gradient of t sums the cotangent over pixels in float32."""
    return h + t[:, None, None, :].astype(h.dtype)


def _add_per_sample_fwd(h, t):
    return add_per_sample(h, t), jnp.zeros((0,), t.dtype)  # only t's dtype is needed


def _add_per_sample_bwd(t_like, g):
    return g, _pixel_sum(g).astype(t_like.dtype)


add_per_sample.defvjp(_add_per_sample_fwd, _add_per_sample_bwd)


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


def _conv_fwd(x, kernel, dtype):
    k = kernel.astype(dtype)
    return _conv3x3_dots(x, k), (x, k)


def _conv_bwd(dtype, res, g):
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


conv3x3_dots.defvjp(_conv_fwd, _conv_bwd)

# XLA:CPU's YNNPACK kernel-gradient convolution (its default for 3x3 convolutions, which bfloat16
# compute keeps; diffjax/kernels/cpu_runtime.py) slows down per FLOP once the activations it
# contracts outgrow the caches: measured on [32, 32, 32, 128] -> 128, one call takes 112 ms,
# sixteen calls on 2-image chunks 64 ms in all (bench/README.md). Chunks hold at least this
# many pixels.
KERNEL_GRAD_CHUNK_PIXELS = 2048
KERNEL_GRAD_MAX_CHUNKS = 32


def kernel_grad_chunks(batch: int, pixels: int) -> int:
    """How many equal batch chunks the kernel gradient is summed over (a divisor of batch)."""
    n = min(KERNEL_GRAD_MAX_CHUNKS, max(1, batch * pixels // KERNEL_GRAD_CHUNK_PIXELS))
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
    return onednn.conv3x3(x, kernel.astype(dtype), strides)


def _onednn_fwd(x, kernel, strides, dtype, chunks):
    return onednn.conv3x3(x, kernel.astype(dtype), strides), (x, kernel)


def _onednn_bwd(strides, dtype, chunks, res, g):
    x, kernel = res
    k = kernel.astype(dtype)
    if strides == 1:
        flipped = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)  # [3, 3, O, C]
        dx = onednn.conv3x3(g.astype(dtype), flipped, 1).astype(x.dtype)
    else:
        dx = xla_conv_input_grad(g, k.astype(F32), strides, x.shape[1:3]).astype(x.dtype)
    # float32 operands: XLA:CPU computes bfloat16 convolutions in float32 anyway, and this
    # kernel-gradient convolution was measured (and chunked) in float32.
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
    onednn_ok: bool | None = None,
) -> str:
    """How ``Conv3x3`` computes a 3x3 convolution of a [B, H, W, C] input on ``platform``.

    "winograd4" / "winograd" (``winograd.conv3x3_winograd`` with 4x4 / 2x2 output tiles),
    "onednn" (``conv3x3_onednn``), "dots" (nine bfloat16 products, ``conv3x3_dots``) or "xla"
    (``conv3x3_xla``). All but the last are for XLA:CPU, "onednn" where ``onednn_ok`` (default:
    ``onednn.available(dtype)``), "dots" and "xla" where not; GPUs and TPUs get XLA's convolution,
    for which cuDNN and the TPU compiler choose their own algorithms.
    """
    if platform != "cpu":
        return "xla"
    fast = onednn.available(dtype) if onednn_ok is None else onednn_ok
    tile = winograd.winograd_tile(shape, features, dtype, fast) if strides == 1 else 0
    if tile:
        return _WINOGRAD_ALGORITHM[tile]
    if fast:
        return "onednn"
    bf16 = jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
    if bf16 and strides == 1 and shape[-1] >= BF16_DOT_CONV_MIN_CHANNELS:
        return "dots"
    return "xla"


# Platform -> dtype of XLA's convolution results, where not float32 (None: the compute dtype,
# as torch's autocast does). cuDNN accumulates bfloat16 convolutions in float32 either way, but
# asked for a float32 result XLA:GPU runs them as TF32 convolutions on float32 copies: on an
# H100 a CIFAR-10 layer's forward + both gradients took 0.723 ms ([128, 32, 32, 128] -> 128)
# and 0.784 ms ([128, 16, 16, 256] -> 256), as in float32, and 0.453 / 0.399 ms with bfloat16
# results (bench/conv_dtypes.py); the CIFAR-10 step's kernels from 33.9 to 21.4 ms per step.
# The kernel gradient is still summed in float32.
CONV_RESULT = {"gpu": None}


def _chunks(x: jax.Array, dtype: Any, platform: str) -> int:
    # Chunked kernel gradients pay off under XLA's default YNNPACK convolutions (kept for
    # bfloat16 on CPU); float32 runs under cpu_runtime's fusions, where one call is faster.
    bf16 = jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
    cpu = platform == "cpu"
    return kernel_grad_chunks(x.shape[0], x.shape[1] * x.shape[2]) if bf16 and cpu else 1


# algorithm -> (x, kernel, strides, dtype, platform) -> [B, H', W', O], float32 but on GPUs
_CONV3X3 = {
    "winograd4": lambda x, kernel, strides, dtype, platform: winograd.conv3x3_winograd(
        x, kernel, dtype, 4
    ),
    "winograd": lambda x, kernel, strides, dtype, platform: winograd.conv3x3_winograd(
        x, kernel, dtype, 2
    ),
    "onednn": lambda x, kernel, strides, dtype, platform: conv3x3_onednn(
        x, kernel, strides, dtype, _chunks(x, dtype, platform)
    ),
    "dots": lambda x, kernel, strides, dtype, platform: conv3x3_dots(x, kernel, dtype),
    "xla": lambda x, kernel, strides, dtype, platform: conv3x3_xla(
        x, kernel, strides, dtype, _chunks(x, dtype, platform), CONV_RESULT.get(platform, F32)
    ),
}


class Dense(nn.Module):
    """y = (x W + b) * scale over the last axis (a 1x1 convolution on images); float32
    parameters. ``scale`` multiplies the float32 result before its one rounding to ``dtype``."""

    features: int
    dtype: Any = F32
    zero: bool = False
    scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = zero_init if self.zero else default_init
        kernel = self.param("kernel", init, (x.shape[-1], self.features), F32)
        bias = self.param("bias", zero_init, (self.features,), F32)
        y = linear(x.astype(self.dtype), kernel, self.dtype) + bias  # float32 [..., features]
        return (y * self.scale).astype(self.dtype)


class Conv3x3(nn.Module):
    """3x3 convolution, SAME padding (stride 2 pads (0, 1) on even sides, as TF and diffusers)."""

    features: int
    dtype: Any = F32
    strides: int = 1
    zero: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = zero_init if self.zero else default_init
        kernel = self.param("kernel", init, (3, 3, x.shape[-1], self.features), F32)
        bias = self.param("bias", zero_init, (self.features,), F32)
        x = x.astype(self.dtype)
        platform = jax.default_backend()
        algorithm = conv3x3_algorithm(x.shape, self.features, self.strides, self.dtype, platform)
        y = _CONV3X3[algorithm](x, kernel, self.strides, self.dtype, platform)
        return (y + bias).astype(self.dtype)


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
    but lighter): one fused elementwise pass, where ``jax.random.bernoulli`` costs ~50x more on
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


class Dropout(nn.Module):
    """Inverted dropout (Srivastava et al. 2014) with masks from ``dropout_mask``; rng "dropout"."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = dropout_mask(self.make_rng("dropout"), x.shape, self.rate)
        return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - self.rate), x.dtype), 0).astype(x.dtype)
