"""The tuned kernels against the plain ones (diffjax.kernels), the reference run in float64.

Each tuned operation (Winograd and XLA convolutions, hand-written VJPs, fused GroupNorm + swish,
attention with a pre-scaled q) must compute the function its plain namesake states in lax /
jax.nn: the value and the VJP, the plain one evaluated in float64 (``jax.enable_x64``) from the
same float32 inputs. Tolerances are relative to the largest reference value: float32 sums of
K <= 600 products carry ~sqrt(K) 6e-8 relative error, Winograd F(4x4, 3x3)'s transforms ~1e-6
(diffjax/kernels/winograd.py); 2e-5 is far below any real defect (a wrong tap, transpose or
group changes values by O(1) of the largest).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_unet import randomized

from diffjax import kernels
from diffjax.kernels import conv, plain
from diffjax.models import init_params
from diffjax.models.unet import UNet

TUNED = kernels.select("tuned", "cpu")
F64 = jnp.float64


def _normal(seed, *shapes):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True)]


def _value_and_vjp(fn, args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return [np.asarray(out, np.float64), *(np.asarray(g, np.float64) for g in vjp(cotangent))]


def _assert_matches_float64_plain(tuned_fn, plain_fn, args, rtol=2e-5):
    """tuned_fn on float32 args vs plain_fn on the same values in float64, value and VJP."""
    out = jax.eval_shape(tuned_fn, *args)
    (g,) = _normal(99, out.shape)
    got = _value_and_vjp(jax.jit(tuned_fn), args, g.astype(out.dtype))
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(a), F64) for a in args]
        want = _value_and_vjp(plain_fn, args64, jnp.asarray(np.asarray(g), F64))
    names = ("value", *(f"grad {i}" for i in range(len(args))))
    for name, a, b in zip(names, got, want, strict=True):
        scale = float(np.max(np.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale, err_msg=name)


def test_dense_matches_plain():
    x, k = _normal(0, (6, 5, 16), (16, 8))
    _assert_matches_float64_plain(
        lambda x, k: TUNED.dense(x, k, jnp.float32), lambda x, k: plain.dense(x, k, F64), (x, k)
    )


@pytest.mark.parametrize(
    "shape, features, strides, algorithm",
    [
        ((16, 16, 16, 64), 64, 1, "winograd4"),
        ((1, 16, 16, 64), 64, 1, "winograd"),
        ((2, 8, 8, 8), 16, 1, "xla"),
        ((2, 9, 8, 8), 16, 2, "xla"),  # odd height: SAME pads (0, 1) after stride 2
    ],
)
def test_conv3x3_matches_plain_for_every_cpu_algorithm(shape, features, strides, algorithm):
    assert conv.conv3x3_algorithm(shape, features, strides, jnp.float32, "cpu") == algorithm
    x, k = _normal(1, shape, (3, 3, shape[-1], features))
    _assert_matches_float64_plain(
        lambda x, k: TUNED.conv3x3(x, 0.1 * k, strides, jnp.float32),
        lambda x, k: plain.conv3x3(x, 0.1 * k, strides, F64),
        (x, k),
    )


@pytest.mark.parametrize("swish", [False, True])
def test_group_norm_matches_plain(swish):
    x, scale, bias = _normal(2, (2, 4, 4, 32), (32,), (32,))
    x = 3.0 + 2.0 * x  # |mean| > std: the shifted statistics must not cancel

    def tuned(x, s, b):
        return TUNED.group_norm(x, s, b, 8, 1e-6, jnp.float32, swish)

    def reference(x, s, b):
        return plain.group_norm(x, s, b, 8, 1e-6, F64, swish)

    _assert_matches_float64_plain(tuned, reference, (x, scale, bias))


def test_attention_matches_plain():
    q, k, v = _normal(3, (2, 16, 8), (2, 16, 8), (2, 16, 8))
    _assert_matches_float64_plain(
        lambda q, k, v: TUNED.attention(q, k, v, jnp.float32),
        lambda q, k, v: plain.attention(q, k, v, F64),
        (q, k, v),
    )


def test_add_per_sample_matches_plain():
    h, t = _normal(4, (2, 4, 4, 8), (2, 8))
    _assert_matches_float64_plain(TUNED.add_per_sample, plain.add_per_sample, (h, t))


def test_dropout_masks_keep_one_minus_rate():
    # Different generators, the same distribution: keep fraction within 5 sigma of 1 - rate.
    n, rate = 200_000, 0.3
    sigma = (rate * (1 - rate) / n) ** 0.5
    for ops in (TUNED, kernels.select("plain", "cpu")):
        keep = np.asarray(ops.dropout_mask(jax.random.key(0), (n,), rate))
        assert abs(keep.mean() - (1 - rate)) < 5 * sigma, ops.name


def _unet_loss(kernels_name, dtype=jnp.float32):
    model = UNet(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        out_channels=1,
        num_groups=8,
        dtype=dtype,
        kernels=kernels_name,
    )
    x, noise = _normal(5, (4, 8, 8, 1), (4, 8, 8, 1))  # [B, H, W, C]
    t = jnp.array([0, 10, 500, 999])
    params = randomized(init_params(model, jax.random.key(6), 8, 1), seed=7)

    def loss(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, x, t, train=False) - noise))

    return loss, params


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
def test_the_unet_is_the_same_function_with_either_kernels(dtype, rtol):
    # A whole network of a few dozen layers: float32 rounding compounds to ~1e-5 of the largest
    # gradient. In bfloat16 both round activations to 8 bits at every layer, at different
    # places (the tuned kernels round once where the plain ones round twice): ~1e-2.
    (l_t, g_t), (l_p, g_p) = (
        jax.jit(jax.value_and_grad(loss))(params)
        for loss, params in (_unet_loss(name, dtype) for name in ("tuned", "plain"))
    )
    np.testing.assert_allclose(l_t, l_p, rtol=rtol)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(g_p))
    for a, b in zip(jax.tree.leaves(g_t), jax.tree.leaves(g_p), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


def test_the_switch_rejects_unknown_names_in_one_line():
    with pytest.raises(ValueError, match=r"kernels='fast'; allowed: tuned, plain, onednn"):
        kernels.select("fast")
    with pytest.raises(ValueError, match="kernels='fast'"):
        x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
        UNet(kernels="fast").init(jax.random.key(0), x, t, train=False)
