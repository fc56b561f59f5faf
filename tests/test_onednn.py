"""Tests of the oneDNN convolution (diffjax.kernels.onednn) against float64 closed forms."""

import functools
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
import pytest
from _conv_reference import (
    CONV_CASES,
    assert_conv_and_grads_match,
    conv3x3_f64,
    conv_and_grads,
    float64_case,
)
from _tiny_unet import tiny_unet_loss
from hypothesis import given, settings

from diffjax import kernels
from diffjax.kernels import conv as C
from diffjax.kernels import cpu_runtime, onednn
from diffjax.models import layers as L


def test_supported_on_avx512_with_the_checked_jaxlib():
    # Where oneDNN is allowed, the fast path must be live, or every test below would pass while
    # Conv3x3 silently fell back to XLA's convolutions; where not, it must say why.
    checked = jaxlib.version.__version__.startswith(onednn.JAXLIB_VERSIONS)
    allowed = checked and platform.machine() in onednn.MACHINES
    flags = cpu_runtime.cpu_flags()
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    for dtype in (jnp.float32, jnp.bfloat16):
        expected = allowed and onednn.isa_problem(dtype, flags, limit) is None
        assert onednn.supported(dtype) == expected, onednn.unsupported_reason(dtype)


# CPU flags of the three kinds of machine the gate tells apart.
_AVX2 = frozenset({"sse4_1", "avx", "avx2", "fma"})
_AVX512 = _AVX2 | set(cpu_runtime.AVX512_CORE_FLAGS)
_AVX512_BF16 = _AVX512 | {"avx512_bf16"}


@pytest.mark.parametrize(
    "flags, limit, f32_ok, bf16_ok",
    [
        (_AVX2, None, False, False),  # the nested-gemm hang and the bfloat16 SIGILL
        (_AVX512, None, True, False),  # Skylake-SP .. Ice Lake: no bfloat16 matmul
        (_AVX512_BF16, None, True, True),  # Zen 4, Cooper Lake, Sapphire Rapids
        (_AVX512_BF16, "AVX2", False, False),  # held to AVX2
        (_AVX512_BF16, "avx512_core", True, False),  # any case, as oneDNN reads it
        (_AVX512_BF16, "AVX512_CORE_BF16", True, True),
        (_AVX512_BF16, "AVX10_1_512", True, True),  # an alias above BF16
        (_AVX512_BF16, "ALL", True, True),
        (_AVX512_BF16, "NOT_AN_ISA", False, False),  # unknown: assume the worst
    ],
)
def test_isa_gate(flags, limit, f32_ok, bf16_ok):
    assert (onednn.isa_problem(jnp.float32, flags, limit) is None) == f32_ok
    assert (onednn.isa_problem(jnp.bfloat16, flags, limit) is None) == bf16_ok
    assert onednn.isa_problem(jnp.float16, _AVX512_BF16, None) is not None  # no such path


def _onednn_in_jaxpr(name: str, dtype) -> bool:
    """Whether a tiny U-Net's loss, with kernels ``name``, contains oneDNN calls (the forward
    pass has every kind: convolutions, projections, attention products)."""
    loss, params = tiny_unet_loss(dtype, kernels=name)
    return "onednn" in str(jax.make_jaxpr(loss)(params))


def test_off_by_default_and_on_only_by_the_switch():
    for dtype in (jnp.float32, jnp.bfloat16):
        assert not _onednn_in_jaxpr("tuned", dtype)
        assert not _onednn_in_jaxpr("plain", dtype)
        assert _onednn_in_jaxpr("onednn", dtype) == onednn.supported(dtype)
    assert "the default" in kernels.describe("tuned") and "XLA's" in kernels.describe("tuned")
    line = kernels.describe("onednn")
    assert ("oneDNN convolutions" in line) == onednn.supported(jnp.float32)


def test_held_to_avx2_the_switch_is_refused_with_the_reason():
    code = (
        "from diffjax import kernels\n"
        "print(kernels.describe('onednn', 'float32'))\n"
        "print(kernels.select('onednn', 'cpu').conv3x3 is not None)"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.splitlines()[0]
    assert "refused" in line and "ONEDNN_MAX_CPU_ISA=AVX2" in line


def test_other_jaxlib_versions_fall_back(monkeypatch):
    monkeypatch.setattr(onednn, "JAXLIB_VERSIONS", ("0.0.",))
    onednn._unsupported_reason.cache_clear()
    try:
        assert not onednn.supported(jnp.float32)
        assert "not one of the checked" in onednn.unsupported_reason(jnp.float32)
        assert "refused" in kernels.describe("onednn")
    finally:
        monkeypatch.undo()
        onednn._unsupported_reason.cache_clear()


needs_onednn = pytest.mark.skipif(
    not onednn.supported(jnp.float32), reason=f"oneDNN: {onednn.unsupported_reason()}"
)
needs_onednn_bf16 = pytest.mark.skipif(
    not onednn.supported(jnp.bfloat16),
    reason=f"oneDNN bfloat16: {onednn.unsupported_reason(jnp.bfloat16)}",
)


def test_an_unsupported_call_is_refused_when_emitted(monkeypatch):
    # Called directly, the primitives check the operands' dtype against the CPU when they are
    # lowered: a clear error instead of oneDNN killing the process.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    a = jnp.ones((1, 4, 8), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="ONEDNN_MAX_CPU_ISA=AVX2"):
        jax.jit(functools.partial(onednn.matmul, transpose_b=True)).lower(a, a)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _onednn_and_vjp(x, w, g, strides, dtype):
    conv = lambda a, b: C.conv3x3_onednn(a, b, strides, dtype)  # noqa: E731
    return conv_and_grads(conv, x.astype(dtype), w, g)


@needs_onednn_bf16
@settings(max_examples=12, deadline=None)
@given(**CONV_CASES)
def test_convolution_and_gradients_match_float64(
    batch, height, width, channels, features, strides, seed
):
    x, w, g, want = float64_case(batch, height, width, channels, features, strides, seed)
    assert_conv_and_grads_match(
        _onednn_and_vjp(x, w, g, strides, jnp.float32),
        _onednn_and_vjp(x, w, g, strides, jnp.bfloat16),
        want,
    )


@needs_onednn
def test_vmap_over_inputs_and_over_kernels():
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (4, 2, 6, 5, 3))  # 4 mapped [2, 6, 5, 3] inputs
    w = jax.random.normal(kw, (4, 3, 3, 3, 7))
    for s in (1, 2):
        one = jax.jit(lambda a, b, s=s: onednn.conv3x3(a, b, s))
        per_input = jax.jit(jax.vmap(lambda a, s=s: onednn.conv3x3(a, w[0], s)))(x)
        per_kernel = jax.jit(jax.vmap(lambda a, b, s=s: onednn.conv3x3(a, b, s)))(x, w)
        for i in range(4):
            want = conv3x3_f64(np.asarray(x[i], np.float64), np.asarray(w[0], np.float64), s)[0]
            np.testing.assert_allclose(per_input[i], want, atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(per_kernel[i], one(x[i], w[i]), atol=1e-4, rtol=1e-4)


@needs_onednn
def test_conv3x3_module_runs_on_onednn_outside_the_winograd_rule():
    conv = L.Conv3x3(features=8, strides=2, kernels="onednn")
    x = jax.random.normal(jax.random.key(7), (2, 8, 8, 4))
    params = conv.init(jax.random.key(8), x)["params"]
    jaxpr = str(jax.make_jaxpr(lambda p: conv.apply({"params": p}, x))(params))
    assert "onednn_conv" in jaxpr and "conv_general_dilated" not in jaxpr
    want = conv3x3_f64(np.asarray(x, np.float64), np.asarray(params["kernel"], np.float64), 2)[0]
    np.testing.assert_allclose(conv.apply({"params": params}, x), want, atol=1e-4, rtol=1e-4)


@needs_onednn
def test_unet_gradients_are_the_same_with_and_without_onednn():
    # The whole network (convolutions, attention products, projections) on oneDNN vs on XLA's
    # ops: the same function, so the same loss and gradients up to float32 summation order.
    assert _onednn_in_jaxpr("onednn", jnp.float32)
    loss, params = tiny_unet_loss(kernels="onednn")
    fast = jax.jit(jax.value_and_grad(loss))(params)
    loss, params = tiny_unet_loss(kernels="tuned")
    slow = jax.jit(jax.value_and_grad(loss))(params)
    # Sums of O(100) float32 terms in another order: ~1e-6 relative. Some leaves' gradients are
    # 0 in exact arithmetic (biases that GroupNorm removes) and rounding noise here, so the
    # tolerance is 1e-4 of the largest gradient anywhere: a wrong operand, transpose or tap
    # changes values by O(1) of it.
    np.testing.assert_allclose(fast[0], slow[0], rtol=1e-5)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(slow[1]))
    for got, want in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(slow[1]), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


@needs_onednn
@pytest.mark.parametrize(
    "dtype, m",
    [(jnp.float32, 2), pytest.param(jnp.bfloat16, 2, marks=needs_onednn_bf16), (jnp.float32, 4)],
)
def test_winograd_products_on_onednn_and_on_xla_agree(dtype, m):
    # Winograd's three batched products go through onednn.bmm: the same convolution and
    # gradients whichever engine runs them.
    from diffjax.kernels import winograd

    kx, kw, kg = jax.random.split(jax.random.key(9), 3)
    x = jax.random.normal(kx, (2, 16, 16, 32))
    w = jax.random.normal(kw, (3, 3, 32, 24))
    g = jax.random.normal(kg, (2, 16, 16, 24))

    def run(use_onednn):
        def outputs(a, b):
            conv = lambda a, b: winograd.conv3x3_winograd(a, b, dtype, m, use_onednn)  # noqa: E731
            return conv_and_grads(conv, a, b, g)

        jaxpr = str(jax.make_jaxpr(outputs)(x.astype(dtype), w))
        got = jax.jit(outputs)(x.astype(dtype), w)
        return "onednn_matmul" in jaxpr, [np.asarray(v, np.float32) for v in got]

    on, fast = run(True)
    off, slow = run(False)
    assert on and not off
    # float32: the same sums in another order (~1e-6 relative); bfloat16 operands are the same
    # bfloat16 values in both, accumulated in float32: again ~1e-6. 1e-4 of the largest value
    # flags a wrong transpose flag (errors of O(1)).
    for got, want in zip(fast, slow, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.max(np.abs(want))))
