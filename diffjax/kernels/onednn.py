"""XLA:CPU's oneDNN convolution and matrix product as JAX primitives: an opt-in for AVX-512 CPUs.

jaxlib's XLA:CPU links oneDNN and runs it for HLO custom calls named ``__onednn$convolution``
(forward convolution) and ``__onednn$matmul`` (batched matrix product), configured by a backend
config (``xla.cpu.OneDnnConvolutionConfig`` / ``OneDnnMatMulConfig`` as JSON). XLA only emits
these calls itself behind off-by-default rewrites; ``conv3x3`` and ``matmul`` emit them directly.

**Off unless the kernel switch asks for it (``model.kernels="onednn"``, ``diffjax.kernels``),
and then only on AVX-512.** XLA runs these calls on its own
thread pool (``OneDnnThreadPool``). Where oneDNN has no brgemm kernel for a product (every
float32 product on an AVX2-only CPU, which oneDNN runs as ``gemm:jit:f32``), its gemm opens a
parallel region inside the call's parallel region on that pool, and the inner one can wait
forever for workers that are all busy in the outer one: train steps, eager forward passes and
500-sample sampling hung on AVX2 CPUs, and glibc once aborted on a corrupted heap. oneDNN has no
bfloat16 kernels below AVX-512 BF16, and an unsupported primitive kills the process (SIGILL)
instead of raising. So the calls are emitted only when all of these hold (``supported``):
x86-64; a jaxlib whose config encoding was checked (``JAXLIB_VERSIONS``); the CPU reaches
oneDNN's ``AVX512_CORE`` for float32 operands (``AVX512_CORE_BF16`` for bfloat16), and so does
``ONEDNN_MAX_CPU_ISA`` if it is set (``REQUIRED_ISA``; there oneDNN ran every product of the
U-Net as ``brg_matmul``, ``ONEDNN_VERBOSE=1``); and a one-time probe of every mode compiles and
matches XLA's own ops. The lowering checks the operands' dtype once more, so a direct call that
would not be supported raises instead. Everywhere else, and by default, the layers use XLA's
convolutions and products (``bench/soak.py``: no hang or crash on AVX-512 or held to AVX2).

Where it is on, its convolutions and batched products are faster than XLA's on AVX-512 CPUs
(bench/README.md, "Default path against torch"); it costs memory (its per-call allocations
fragment the malloc heap) and JAX's persistent compilation cache cannot store programs that
contain these calls.
"""

from __future__ import annotations

import functools
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import batching, mlir

from diffjax.kernels import cpu_runtime
from diffjax.kernels.primitives import F32, dot_f32, same_padding, xla_conv

CONV_TARGET = "__onednn$convolution"
MATMUL_TARGET = "__onednn$matmul"
# The opt-in: 1/true/yes/on uses oneDNN where ``supported``; unset or anything else does not.
# jaxlib versions (prefixes) whose config encoding was checked: 0-based spatial dimension
# indices, strides and paddings as they are, window dilations stored plus one.
JAXLIB_VERSIONS = ("0.10.",)
MACHINES = ("x86_64", "AMD64")
# oneDNN's instruction-set names (``ONEDNN_MAX_CPU_ISA`` values), lowest first; aliases share a
# level. "ALL" is no limit.
ONEDNN_ISAS = (
    ("SSE41",),
    ("AVX",),
    ("AVX2",),
    ("AVX2_VNNI",),
    ("AVX2_VNNI_2",),
    ("AVX512_CORE",),
    ("AVX512_CORE_VNNI",),
    ("AVX512_CORE_BF16",),
    ("AVX512_CORE_FP16", "AVX10_1_512"),
    ("AVX512_CORE_AMX", "AVX10_1_512_AMX"),
    ("AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16"),
    ("AVX10_2_512",),
    ("AVX10_2_512_AMX_2",),
    ("ALL",),
)
# Operand dtype -> (the lowest oneDNN ISA its calls may run at, the CPU flags that ISA needs).
# Below AVX512_CORE float32 products leave brgemm for the nesting gemm (the hang above); below
# AVX512_CORE_BF16 oneDNN has no bfloat16 matmul at all.
REQUIRED_ISA = {
    np.dtype(np.float32): ("AVX512_CORE", cpu_runtime.AVX512_CORE_FLAGS),
    np.dtype(jnp.bfloat16): ("AVX512_CORE_BF16", (*cpu_runtime.AVX512_CORE_FLAGS, "avx512_bf16")),
}

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
        # The last gate before the call exists: an unsupported primitive would kill the process.
        for aval in ctx.avals_in:
            problem = _platform_problem(aval.dtype)
            if problem:
                raise NotImplementedError(f"{target} on {aval.dtype} operands: {problem}")
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
    a: jax.Array,
    b: jax.Array,
    transpose_a: bool = False,
    transpose_b: bool = False,
    onednn: bool = False,
) -> jax.Array:
    """Batched op(a) [B, N, K] @ op(b) [B, K, M] -> float32 [B, N, M]: ``matmul`` where
    ``onednn`` (asked for by a CPU program's kernels) and ``supported`` for the operands' dtype
    (one dtype for both), else XLA's ``dot_general``. Differentiate through a custom VJP made of
    ``bmm`` calls (as ``diffjax.kernels.matmul`` does), not through it."""
    return _BMM[bmm_on_onednn(a, b, onednn)](a, b, transpose_a, transpose_b)


def bmm_on_onednn(a: jax.Array, b: jax.Array, onednn: bool) -> bool:
    """Whether ``bmm(a, b, ..., onednn)`` runs on oneDNN: asked for, one dtype, supported."""
    return onednn and a.dtype == b.dtype and supported(a.dtype)


# --- availability ------------------------------------------------------------------------------


def _probe_cases(rng: np.random.Generator, dtype: np.dtype):
    """(oneDNN op, XLA op, static args, operands): both primitives, every mode the layers use."""
    x = rng.standard_normal((2, 6, 6, 3)).astype(dtype)
    k = rng.standard_normal((3, 3, 3, 5)).astype(dtype)
    a = rng.standard_normal((2, 4, 3)).astype(dtype)  # op(a)
    b = rng.standard_normal((2, 3, 5)).astype(dtype)  # op(b)
    for s in (1, 2):
        yield conv3x3, xla_conv, (s,), (x, k)
    for ta in (False, True):
        for tb in (False, True):
            stored = (np.swapaxes(a, 1, 2) if ta else a, np.swapaxes(b, 1, 2) if tb else b)
            yield matmul, _xla_matmul, (ta, tb), stored


def isa_level(name: str) -> int | None:
    """The rank of a oneDNN ISA name in ``ONEDNN_ISAS`` (any case); None if unknown."""
    name = name.strip().upper()
    return next((i for i, names in enumerate(ONEDNN_ISAS) if name in names), None)


def isa_problem(dtype, flags: frozenset[str], limit: str | None) -> str | None:
    """Why oneDNN calls on ``dtype`` operands must not run on a CPU with ``flags`` under the
    ``ONEDNN_MAX_CPU_ISA`` value ``limit`` (None: unset); None when they may."""
    dtype = np.dtype(dtype)
    if dtype not in REQUIRED_ISA:
        return f"no oneDNN path for {dtype.name} operands (only {_names(REQUIRED_ISA)})"
    need, need_flags = REQUIRED_ISA[dtype]
    missing = sorted(set(need_flags) - flags)
    if missing:
        return (
            f"{dtype.name} needs oneDNN's {need} (CPU flags {', '.join(missing)} missing; "
            f"this CPU: {cpu_runtime.isa(flags)})"
        )
    if limit is not None:
        level = isa_level(limit)
        if level is None or level < isa_level(need):
            return f"ONEDNN_MAX_CPU_ISA={limit} is below the {need} that {dtype.name} needs"
    return None


def _names(table) -> str:
    return ", ".join(np.dtype(d).name for d in table)


def _onednn_isa_limit() -> str | None:
    # oneDNN reads ONEDNN_MAX_CPU_ISA, and DNNL_MAX_CPU_ISA where the former is unset.
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None


def unsupported_reason(dtype=np.float32) -> str | None:
    """Why ``conv3x3`` and ``matmul`` on ``dtype`` operands may not be used in this process
    (machine, jaxlib version, ISA, or a probe of every mode that failed to compile or to match
    XLA's ops); None when they may. Cached per process and dtype."""
    return _unsupported_reason(np.dtype(dtype))


def _platform_problem(dtype) -> str | None:
    """The machine, jaxlib and ISA part of ``unsupported_reason`` (no probe)."""
    import jaxlib.version

    if platform.machine() not in MACHINES:
        return f"oneDNN calls are for x86-64, not {platform.machine()}"
    version = jaxlib.version.__version__
    if not version.startswith(JAXLIB_VERSIONS):
        return f"jaxlib {version} is not one of the checked {', '.join(JAXLIB_VERSIONS)}x"
    return isa_problem(dtype, cpu_runtime.cpu_flags(), _onednn_isa_limit())


@functools.cache
def _unsupported_reason(dtype: np.dtype) -> str | None:
    problem = _platform_problem(dtype)
    if problem:
        return problem
    try:
        for op, ref, static, args in _probe_cases(np.random.default_rng(0), dtype):
            statics = tuple(range(len(args), len(args) + len(static)))
            # Compiled explicitly: this may run while a caller's jit is tracing, which would
            # stage a plain jit call into that trace instead of running it.
            compiled = (
                jax.jit(f, static_argnums=statics).lower(*args, *static).compile()
                for f in (op, ref)
            )
            got, want = (np.asarray(c(*args), np.float32) for c in compiled)
            # bfloat16 operands: both sides accumulate in float32 from the same rounded inputs.
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                return f"the probe of {op.__name__}{static} did not match XLA's op"
    except Exception as e:  # noqa: BLE001 - any failure (no such custom call, bad config) means no
        return f"the probe failed: {type(e).__name__}: {e}"
    return None


def supported(dtype=np.float32) -> bool:
    """Whether oneDNN calls on ``dtype`` operands can run safely here (``unsupported_reason``)."""
    return unsupported_reason(dtype) is None


def describe(dtype=np.float32, requested: bool = False) -> str:
    """One line saying which convolutions and products a CPU program of ``dtype`` compute uses
    under the tuned kernels, and why; ``requested``: whether the kernels ask for oneDNN."""
    if requested and supported(dtype):
        return (
            f"CPU kernels: oneDNN convolutions and products (kernels=onednn; "
            f"{cpu_runtime.isa()}) with Winograd and XLA's ops"
        )
    if requested:
        why = unsupported_reason(dtype)
        return f"CPU kernels: XLA's convolutions and products with Winograd (oneDNN refused: {why})"
    return (
        "CPU kernels: XLA's convolutions and products with Winograd (the default; "
        "kernels=onednn opts in to oneDNN on AVX-512 CPUs)"
    )
