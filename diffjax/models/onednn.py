"""XLA:CPU's oneDNN convolution and matrix product as JAX primitives, for x86 CPUs.

jaxlib's XLA:CPU links oneDNN and runs it for HLO custom calls named ``__onednn$convolution``
(forward convolution) and ``__onednn$matmul`` (batched matrix product), configured by a backend
config (``xla.cpu.OneDnnConvolutionConfig`` / ``OneDnnMatMulConfig`` as JSON). XLA only emits
these calls itself behind off-by-default rewrites; ``conv3x3`` and ``matmul`` emit them directly.
On the 2-core Zen 4 of ``bench/README.md``:

- a [64, 32, 32, 32] -> 32 3x3 convolution runs at 215 GFLOP/s in float32 (XLA's own kernel:
  175) and 440 in bfloat16 (XLA computes bfloat16 convolutions at 70); the same for the input
  gradient, a forward convolution with the flipped, transposed kernel. The kernel gradient is
  not a small forward convolution, so ``diffjax.models.layers`` keeps XLA's for it;
- the attention products of the small 32x32 model ([64, 256, 64] x [64, 64, 256] and the
  like) run at 165-185 GFLOP/s in float32 and 270-340 in bfloat16, where XLA gives them to one
  thread at 55-86.

The configs are XLA's internal format, which has changed between releases, so the calls are only
used on the jaxlib versions they were checked on (``JAXLIB_VERSIONS``), on x86-64, and after a
one-time probe has compiled both and matched XLA's own ops (``available``). ``DIFFJAX_ONEDNN=0``
turns them off; then (and on other machines) the layers keep XLA's convolutions and products.
"""

from __future__ import annotations

import functools
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import batching, mlir

from diffjax import cpu_runtime
from diffjax.models.primitives import F32, dot_f32, same_padding, xla_conv

CONV_TARGET = "__onednn$convolution"
MATMUL_TARGET = "__onednn$matmul"
ENV = "DIFFJAX_ONEDNN"
# jaxlib versions (prefixes) whose config encoding was checked: 0-based spatial dimension
# indices, strides and paddings as they are, window dilations stored plus one.
JAXLIB_VERSIONS = ("0.10.",)
MACHINES = ("x86_64", "AMD64")

# NHWC activations and HWIO kernels in XLA's dimension numbering.
_NHWC = {"batch_dim": 0, "feature_dim": 3, "spatial_dims": [1, 2]}
_HWIO = {"input_feature_dim": 2, "output_feature_dim": 3, "spatial_dims": [0, 1]}


def conv_config(strides: int, pad_lo: tuple[int, int], pad_hi: tuple[int, int]) -> str:
    """The backend config of a 2-D NHWC x HWIO -> NHWC convolution: equal strides along H and W,
    ``pad_lo``/``pad_hi`` zeros before/after the (H, W) dimensions."""
    window = {
        "pad_left": list(pad_lo),
        "pad_right": list(pad_hi),
        "strides": [strides, strides],
        "window_dilations": [1, 1],  # dilation 1 is stored as 1 (oneDNN counts from 0)
    }
    conv = {
        "dims": 4,
        "feature_groups": 1,
        "input": {"data": _NHWC},
        "kernel": {"filter": _HWIO},
        "output": {"data": _NHWC},
        "window": window,
    }
    return json.dumps({"onednn_conv_config": conv})


def matmul_config(transpose_a: bool, transpose_b: bool) -> str:
    """The backend config of a batched product op(a) @ op(b), op = transpose or identity."""
    return json.dumps(
        {"onednn_matmul_config": {"transpose_a": transpose_a, "transpose_b": transpose_b}}
    )


def _custom_call(target: str, config: str):
    """A lowering rule emitting the custom call ``target`` with backend config ``config``."""

    def lowering(ctx, *operands, **params):
        (out,) = ctx.avals_out
        call = stablehlo.CustomCallOp(
            [mlir.aval_to_ir_type(ctx.module_context, out)],
            list(operands),
            target,
            has_side_effect=False,
            backend_config=ir.StringAttr.get(config(**params)),
            # 1: the legacy calling convention, whose backend config is this string (XLA parses
            # it as the JSON form of its BackendConfig proto).
            api_version=ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 1),
        )
        return call.results

    return lowering


def _primitive(name: str, target: str, config, abstract_eval, batcher) -> Primitive:
    prim = Primitive(name)

    @functools.cache
    def compiled(**params):
        return jax.jit(functools.partial(prim.bind, **params))

    # Eager calls (outside jit) compile the one custom call, once per configuration.
    prim.def_impl(lambda *args, **params: compiled(**params)(*args))
    prim.def_abstract_eval(abstract_eval)
    mlir.register_lowering(prim, _custom_call(target, config), platform="cpu")
    batching.primitive_batchers[prim] = batcher
    return prim


# --- 3x3 convolution ---------------------------------------------------------------------------


def _conv_shape(x, kernel, *, strides: int, pad_lo: tuple, pad_hi: tuple):
    spatial = tuple(
        (n + lo + hi - k) // strides + 1
        for n, lo, hi, k in zip(x.shape[1:3], pad_lo, pad_hi, kernel.shape[:2], strict=True)
    )
    return jax.core.ShapedArray((x.shape[0], *spatial, kernel.shape[3]), F32)


def _conv_batch(args, dims, **params):
    """vmap: a mapped input folds into the batch dimension; a mapped kernel (per-example
    weights) falls back to XLA's convolution under vmap."""
    x, kernel = args
    x_dim, k_dim = dims
    if k_dim is not None:  # JAX marks an unmapped operand with None
        x = batching.bdim_at_front(x, x_dim, kernel.shape[k_dim])
        kernel = jnp.moveaxis(kernel, k_dim, 0)
        conv = functools.partial(xla_conv, strides=params["strides"])
        return jax.vmap(conv)(x, kernel), 0
    x = jnp.moveaxis(x, x_dim, 0)  # [V, B, H, W, C]
    out = onednn_conv_p.bind(x.reshape(-1, *x.shape[2:]), kernel, **params)
    return out.reshape(*x.shape[:2], *out.shape[1:]), 0


onednn_conv_p = _primitive("onednn_conv", CONV_TARGET, conv_config, _conv_shape, _conv_batch)


def conv3x3(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
    """SAME 3x3 convolution of [B, H, W, C] by [3, 3, C, O] -> float32 [B, H', W', O].

    Stride 2 pads (0, 1) on even sides, as ``lax.conv_general_dilated``'s "SAME". Operands in
    float32 or bfloat16 (both the same dtype); the result accumulates and is stored in float32.
    Not differentiable by itself: ``layers.conv3x3_onednn`` carries the VJP.
    """
    pad_lo, pad_hi = zip(*(same_padding(n, strides) for n in x.shape[1:3]), strict=True)
    return onednn_conv_p.bind(x, kernel, strides=strides, pad_lo=pad_lo, pad_hi=pad_hi)


# --- batched matrix product --------------------------------------------------------------------


def _matmul_shape(a, b, *, transpose_a: bool, transpose_b: bool):
    n = a.shape[-1] if transpose_a else a.shape[-2]
    m = b.shape[-2] if transpose_b else b.shape[-1]
    return jax.core.ShapedArray((*a.shape[:-2], n, m), F32)


def _matmul_batch(args, dims, **params):
    """vmap: the mapped axis (broadcast onto an unmapped operand) folds into the batch axis."""
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
    a, b = (batching.bdim_at_front(x, d, size) for x, d in zip(args, dims, strict=True))
    out = onednn_matmul_p.bind(a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:]), **params)
    return out.reshape(size, -1, *out.shape[1:]), 0


onednn_matmul_p = _primitive(
    "onednn_matmul", MATMUL_TARGET, matmul_config, _matmul_shape, _matmul_batch
)


def matmul(
    a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False
) -> jax.Array:
    """Batched op(a) [B, N, K] @ op(b) [B, K, M] -> float32 [B, N, M] (op: transpose of the
    last two axes where asked). Operands in float32 or bfloat16, both the same dtype.
    Not differentiable by itself: its callers (``layers.bmm_nt``, ``bmm_nn``, ``linear``,
    ``winograd.conv3x3_winograd``) carry custom VJPs made of products."""
    return onednn_matmul_p.bind(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _xla_matmul(a, b, transpose_a, transpose_b):
    ca, cb = (1 if transpose_a else 2), (2 if transpose_b else 1)
    return dot_f32(a, b, (ca,), (cb,), batch=True)


# oneDNN usable here -> the batched product. XLA:CPU gives batched products with few rows per
# batch element (attention's 256 x 256 x 64, Winograd's transposed-operand kernel gradient) to one
# thread or to a slow kernel; oneDNN splits the batch over the threads.
_BMM = {True: matmul, False: _xla_matmul}


def bmm(
    a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False
) -> jax.Array:
    """Batched op(a) [B, N, K] @ op(b) [B, K, M] -> float32 [B, N, M]: ``matmul`` when the
    default backend is the CPU and ``available()``, else XLA's ``dot_general``. Differentiate
    through a custom VJP made of ``bmm`` calls (as ``layers.bmm_nt`` does), not through it."""
    fast = jax.default_backend() == "cpu" and available()
    return _BMM[fast](a, b, transpose_a, transpose_b)


# --- availability ------------------------------------------------------------------------------


def _probe_cases(rng: np.random.Generator):
    """(oneDNN op, XLA op, static args, operands): both primitives, every mode the layers use."""
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    k = rng.standard_normal((3, 3, 3, 5)).astype(np.float32)
    a = rng.standard_normal((2, 4, 3)).astype(np.float32)  # op(a)
    b = rng.standard_normal((2, 3, 5)).astype(np.float32)  # op(b)
    for s in (1, 2):
        yield conv3x3, xla_conv, (s,), (x, k)
    for ta in (False, True):
        for tb in (False, True):
            stored = (np.swapaxes(a, 1, 2) if ta else a, np.swapaxes(b, 1, 2) if tb else b)
            yield matmul, _xla_matmul, (ta, tb), stored


@functools.cache
def available() -> bool:
    """Whether ``conv3x3`` and ``matmul`` may be used here: the version, machine and switch
    allow it, and a probe of every mode compiles and matches XLA's ops. Cached per process."""
    import jaxlib.version

    if not cpu_runtime.env_enabled(ENV):
        return False
    if platform.machine() not in MACHINES:
        return False
    if not jaxlib.version.__version__.startswith(JAXLIB_VERSIONS):
        return False
    try:
        for op, ref, static, args in _probe_cases(np.random.default_rng(0)):
            statics = tuple(range(len(args), len(args) + len(static)))
            # Compiled explicitly: this may run while a caller's jit is tracing, which would
            # stage a plain jit call into that trace instead of running it.
            compiled = (
                jax.jit(f, static_argnums=statics).lower(*args, *static).compile()
                for f in (op, ref)
            )
            got, want = (np.asarray(c(*args)) for c in compiled)
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                return False
    except Exception:  # noqa: BLE001 - any failure (no such custom call, bad config) means no
        return False
    return True
