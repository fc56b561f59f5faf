"""The layers' GPU/TPU code paths (XLA's convolutions with hand-written gradients, GroupNorm's
statistics by repeat, reductions instead of products), run on the CPU: against float64, and the
whole U-Net against its CPU path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _conv_reference import CONV_CASES, assert_conv_and_grads_match, float64_case
from _tiny_unet import tiny_unet_loss
from hypothesis import given, settings
from hypothesis import strategies as st

from diffjax.kernels import conv as L
from diffjax.kernels import normalization as N

BF16 = jnp.bfloat16


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _xla_conv_and_vjp(x, w, g, strides, dtype, out):
    conv = lambda a, b: L.conv3x3_xla(a, b, strides, dtype, 1, out)  # noqa: E731
    y, vjp = jax.vjp(conv, x.astype(dtype), w)
    return (y, *vjp(g.astype(y.dtype)))


@settings(max_examples=12, deadline=None)
@given(**CONV_CASES)
def test_xla_convolution_gradients_match_float64(
    batch, height, width, channels, features, strides, seed
):
    # The transposed convolutions' paddings and dilations on odd and even sides, both strides.
    # float32 with float32 results (CPU form); bfloat16 with bfloat16 results (GPU form).
    x, w, g, want = float64_case(batch, height, width, channels, features, strides, seed)
    assert_conv_and_grads_match(
        _xla_conv_and_vjp(x, w, g, strides, jnp.float32, jnp.float32),
        _xla_conv_and_vjp(x, w, g, strides, BF16, None),
        want,
        bfloat16_dtypes=(BF16, BF16, jnp.float32),
    )


@pytest.mark.parametrize("out", [jnp.float32, None])
@pytest.mark.parametrize("strides", [1, 2])
def test_bfloat16_backward_convolutions_take_bfloat16_operands(strides, out):
    # JAX's own transpose rules would upcast the bfloat16 operand to the float32 cotangent's
    # dtype, and XLA:GPU then runs the backward convolutions in TF32 (bench/README.md, "GPU").
    x = jnp.ones((2, 8, 8, 4), BF16)
    w = jnp.ones((3, 3, 4, 6), jnp.float32)

    def loss(a, b):
        return jnp.sum(L.conv3x3_xla(a, b, strides, BF16, 1, out).astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w).jaxpr
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 3  # forward, input gradient, kernel gradient
    for e in convs:
        assert [v.aval.dtype for v in e.invars] == [BF16, BF16]
        assert e.outvars[0].aval.dtype == (out or BF16)


@settings(max_examples=20, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    groups=st.sampled_from([1, 2, 4, 32]),
    per_group=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_group_expansions_agree_exactly(lead, groups, per_group, seed):
    # Both put v[..., g] in every channel of group g: exact copies, so equal bit for bit.
    v = np.random.default_rng(seed).normal(size=(*lead, groups)).astype(np.float32)
    c = groups * per_group
    want = np.repeat(v, per_group, axis=-1)
    np.testing.assert_array_equal(N._expand_product(jnp.asarray(v), c), want)
    np.testing.assert_array_equal(N._expand_repeat(jnp.asarray(v), c), want)


def _unet_loss_and_grads(platform: str, dtype, monkeypatch):
    """The tiny U-Net's loss and gradients as traced for ``platform`` (run on the CPU)."""
    loss, params = tiny_unet_loss(dtype)
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    jax.clear_caches()  # JAX caches the traces of custom VJP rules
    try:
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        return jax.jit(jax.value_and_grad(loss))(params), jaxpr
    finally:
        monkeypatch.undo()
        jax.clear_caches()


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_unet_on_the_gpu_path_matches_the_cpu_path(monkeypatch, dtype):
    # The same function computed by other ops (XLA's convolutions instead of Winograd and oneDNN,
    # GroupNorm's statistics by repeat, reductions instead of products).
    (cpu_loss, cpu_grads), _ = _unet_loss_and_grads("cpu", dtype, monkeypatch)
    (gpu_loss, gpu_grads), jaxpr = _unet_loss_and_grads("gpu", dtype, monkeypatch)
    assert "onednn" not in jaxpr and "conv_general_dilated" in jaxpr
    # float32: sums in another order, ~1e-6 relative; 1e-4 of the largest gradient flags a wrong
    # operand, tap or transpose (O(1) of it). bfloat16: both paths round activations to 8
    # significant bits at different places (and the GPU path its convolution results once
    # more), ~2^-9 relative per rounding through a dozen layers; 5e-2 is still far below O(1).
    tol = {jnp.float32: 1e-4, BF16: 5e-2}[dtype]
    np.testing.assert_allclose(gpu_loss, cpu_loss, rtol=tol)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(cpu_grads))
    for got, want in zip(jax.tree.leaves(gpu_grads), jax.tree.leaves(cpu_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
