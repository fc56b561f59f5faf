"""Tests of the DDPM U-Net: architecture size, semantics of its parts, dtypes, errors."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from _conv_reference import (
    assert_conv_and_grads_match,
    assert_float32_conv_and_grads_match,
    conv3x3_f64,
    conv_and_grads,
    float64_case,
)
from _tiny_unet import randomized
from hypothesis import given, settings
from hypothesis import strategies as st

from diffjax.kernels import conv as C
from diffjax.kernels import elementwise as E
from diffjax.kernels import matmul as M
from diffjax.kernels import winograd as W
from diffjax.kernels.tuning import TUNING
from diffjax.models import create_model, init_params
from diffjax.models import layers as L
from diffjax.models.unet import AttnBlock, ResnetBlock, UNet, timestep_embedding

# Smallest model that still has two levels, a downsample/upsample pair and attention at 4x4.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
SIZE, CH = 8, 1


def _count(model, size, channels):
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            jnp.zeros((1, size, size, channels)),
            jnp.zeros((1,), jnp.int32),
            train=False,
        )
    )
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


@pytest.fixture(scope="module")
def tiny():
    model = UNet(**TINY, out_channels=CH)
    initial = init_params(model, jax.random.key(0), SIZE, CH)
    x = jax.random.normal(jax.random.key(2), (2, SIZE, SIZE, CH))
    t = jnp.array([0, 999], jnp.int32)
    return model, randomized(initial), x, t, initial


def test_param_count_matches_reference_cifar10_and_256():
    # Ho et al. 2020 reference model sizes (35.7M for CIFAR-10; 114M for 256x256).
    assert _count(UNet(), 32, 3) == 35_746_307
    assert _count(UNet(ch_mult=(1, 1, 2, 2, 4, 4)), 256, 3) == 113_673_219


def test_output_shape_and_zero_init(tiny):
    model, _, x, t, initial = tiny
    out = jax.jit(lambda p: model.apply({"params": p}, x, t, train=False))(initial)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # conv_out is zero-initialised as in the reference model: the untrained output is exactly 0.
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_create_model_learned_variance_has_2c_outputs():
    cfg = ml_collections.ConfigDict(
        {
            "model": dict(TINY, resamp_with_conv=False, dtype="float32", num_classes=0),
            "data": {"channels": 3},
            "diffusion": {"var_type": "learned_range"},
        }
    )
    model = create_model(cfg)
    assert model.out_channels == 6
    out = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0),
            jnp.zeros((2, SIZE, SIZE, 3)),
            jnp.zeros((2,), jnp.int32),
            train=False,
        )[0]
    )
    assert out.shape == (2, SIZE, SIZE, 6)
    cfg.model.dtype = "float16"
    with pytest.raises(ValueError, match="float16"):
        create_model(cfg)


def test_timestep_embedding_matches_float64_formula():
    t = np.array([0, 1, 17, 999])
    dim = 10
    half = dim // 2
    freqs = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))
    args = t[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.int32), dim))
    # float32 argument t * w has relative error ~6e-8, i.e. absolute ~6e-5 at t = 999; sin/cos
    # are 1-Lipschitz, so 1e-4 bounds the error while a wrong frequency is off by O(1).
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got[0], [0.0] * half + [1.0] * half)
    assert timestep_embedding(jnp.zeros((3,), jnp.int32), 7).shape == (3, 7)


def test_dropout_mask_rate_and_independence():
    n = 200_000
    m1 = np.asarray(E.dropout_mask(jax.random.key(0), (n,), 0.1))
    m2 = np.asarray(E.dropout_mask(jax.random.key(1), (n,), 0.1))
    # Binomial: std of the dropped fraction is sqrt(0.09 / n) = 6.7e-4; 5 sigma = 3.4e-3.
    for m in (m1, m2):
        assert abs((1 - m.mean()) - 0.1) < 3.4e-3
    # Independent masks agree on a fraction 0.9^2 + 0.1^2 = 0.82 of the elements.
    assert abs((m1 == m2).mean() - 0.82) < 5e-3
    # Neighbouring elements are uncorrelated (a weak hash would show stripes).
    drop = (~m1).astype(np.float64)
    assert abs(np.corrcoef(drop[:-1], drop[1:])[0, 1]) < 0.015
    x = jnp.ones((4, 1000))
    y = np.asarray(L.Dropout(0.1).apply({}, x, train=True, rngs={"dropout": jax.random.key(2)}))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.9], rtol=1e-6)  # inverted scaling


def test_custom_vjp_products_match_autodiff_of_reference_ops():
    kx, kw, kg = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(kx, (2, 6, 6, 8))
    w = jax.random.normal(kw, (3, 3, 8, 5))
    g = jax.random.normal(kg, (2, 6, 6, 5))

    def ref_conv(x, w):
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

    cases = [
        (lambda x, w: C.conv3x3_dots(x, w, jnp.float32), ref_conv, x, w, g),
        (lambda a, b: M.linear(a, b, jnp.float32), lambda a, b: a @ b, x, w[0, 0], g),
        (M.bmm_nt, lambda a, b: jnp.einsum("bnk,bmk->bnm", a, b), x[:, 0], x[:, 1], x[:, 2, :, :6]),
        (M.bmm_nn, lambda a, b: jnp.einsum("bnk,bkm->bnm", a, b), x[:, 0], w[0, :2], g[:, 0]),
    ]
    for fn, ref, a, b, ct in cases:
        out, vjp = jax.vjp(fn, a, b)
        ref_out, ref_vjp = jax.vjp(ref, a, b)
        # Sums of <= 72 O(1) float32 products: ~1e-6 relative; 1e-4 absolute is ample.
        np.testing.assert_allclose(out, ref_out, atol=1e-4, rtol=1e-4)
        for got, want in zip(vjp(ct), ref_vjp(ct), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # bfloat16 operands, float32 accumulation: relative error ~ unit roundoff 2^-9 = 2e-3 of the
    # inputs (random-walk over 72 terms keeps it there); 1e-2 flags a float32-less accumulation.
    xb = x.astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: C.conv3x3_dots(a, b, jnp.bfloat16), xb, w)
    ref_out, ref_vjp = jax.vjp(ref_conv, x, w)
    for got, want in zip((out, *vjp(g)), (ref_out, *ref_vjp(g)), strict=True):
        got = jnp.asarray(got, jnp.float32)
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


def test_conv3x3_xla_chunked_kernel_grad_matches_autodiff():
    kx, kw, kg = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (6, 32, 32, 3))  # 6 x 1024 pixels: 3 chunks of 2 images
    w = jax.random.normal(kw, (3, 3, 3, 5))
    assert C.kernel_grad_chunks(6, 32 * 32) == 3
    dn = ("NHWC", "HWIO", "NHWC")
    for s in (1, 2):
        g = jax.random.normal(kg, (6, 32 // s, 32 // s, 5))
        out, vjp = jax.vjp(lambda a, b, s=s: C.conv3x3_xla(a, b, s, jnp.float32, 3), x, w)
        ref = lambda a, b, s=s: jax.lax.conv_general_dilated(
            a, b, (s, s), "SAME", dimension_numbers=dn
        )
        ref_out, ref_vjp = jax.vjp(ref, x, w)
        np.testing.assert_allclose(out, ref_out, atol=1e-4, rtol=1e-4)
        # The kernel gradient sums 6 * 1024 / s^2 O(1) products (|sum| ~ 80): float32 summation
        # in another order differs by ~1e-5 relative; 1e-4 relative + 1e-3 absolute is ample,
        # and a dropped or doubled chunk changes it by O(1).
        for got, want in zip(vjp(g), ref_vjp(g), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
    # bfloat16 compute: the input gradient comes back in the input dtype, the kernel gradient
    # in float32 (the parameter's dtype).
    dx, dk = jax.vjp(
        lambda a, b: C.conv3x3_xla(a, b, 1, jnp.bfloat16, 3), x.astype(jnp.bfloat16), w
    )[1](jax.random.normal(kg, (6, 32, 32, 5)))
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32


@functools.partial(jax.jit, static_argnums=(3, 4))
def _winograd_and_vjp(x, w, g, dtype, m=2):
    conv = lambda a, b: W.conv3x3_winograd(a, b, dtype, m)  # noqa: E731
    return conv_and_grads(conv, x.astype(dtype), w, g)


# [B, H, W, C] inputs of tiles_h x tiles_w Winograd output tiles, and a seed.
_TILED_MAPS = dict(
    batch=st.integers(1, 3),
    tiles_h=st.integers(1, 5),
    tiles_w=st.integers(1, 5),
    channels=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=10, deadline=None)
@given(**_TILED_MAPS, features=st.integers(1, 9))
def test_winograd_convolution_and_its_gradients_match_float64(
    batch, tiles_h, tiles_w, channels, features, seed
):
    x, w, g, want = float64_case(batch, 2 * tiles_h, 2 * tiles_w, channels, features, 1, seed)
    # The transforms add with weights +-1, +-1/2 (exact in binary): the tolerances of the
    # direct form hold (_conv_reference).
    assert_conv_and_grads_match(
        _winograd_and_vjp(x, w, g, jnp.float32), _winograd_and_vjp(x, w, g, jnp.bfloat16), want
    )


@settings(max_examples=10, deadline=None)
@given(**_TILED_MAPS, features=st.integers(1, 9))
def test_winograd_4x4_convolution_and_its_gradients_match_float64(
    batch, tiles_h, tiles_w, channels, features, seed
):
    x, w, g, want = float64_case(batch, 4 * tiles_h, 4 * tiles_w, channels, features, 1, seed)
    # F(4x4, 3x3)'s weights (up to 25 on a transformed input, 1/6 and 1/24 on kernel taps, 64
    # on an output) amplify float32 rounding to ~1e-6 of the largest value (measured <= 7e-6):
    # 1e-4 of it still flags a wrong tap, sign, phase or tile (errors of O(1)). Float32 only:
    # bfloat16 compute keeps F(2x2) (``winograd_tile``).
    assert_float32_conv_and_grads_match(_winograd_and_vjp(x, w, g, jnp.float32, 4), want)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("by_channel", [True, False], ids=["by_channel", "as_stored"])
def test_winograd_kernel_gradient_in_either_layout_matches_float64(monkeypatch, m, by_channel):
    # The kernel gradient reads the transformed input stored by channel where the products run
    # on XLA (``TUNING.winograd_grad_by_channel``), as the forward stores it elsewhere (oneDNN):
    # both must give the float64 gradients (tolerance as the F(4x4) test above), and the first
    # must keep its layout behind an optimisation barrier, or XLA folds it back.
    monkeypatch.setattr(
        W, "TUNING", dataclasses.replace(TUNING, winograd_grad_by_channel=("xla",) * by_channel)
    )
    x, w, g, want = float64_case(2, 4 * m, 4 * m, 5, 6, 1, seed=11)
    fn = jax.jit(
        lambda a, b, c: conv_and_grads(
            lambda p, q: W.conv3x3_winograd(p, q, jnp.float32, m), a, b, c
        )
    )
    assert_float32_conv_and_grads_match(fn(x, w, g), want)
    assert ("opt-barrier" in fn.lower(x, w, g).as_text("hlo")) == by_channel


def test_winograd_tile_must_divide_the_map():
    x, w = jnp.zeros((1, 6, 6, 2)), jnp.zeros((3, 3, 2, 2))
    with pytest.raises(ValueError, match=r"m=4 for a 6x6 map; allowed: m in \[2, 4\]"):
        W.conv3x3_winograd(x, w, jnp.float32, 4)
    with pytest.raises(ValueError, match="m=3"):
        W.conv3x3_winograd(x, w, jnp.float32, 3)


# Lavin & Gray 2016's B^T: eq. 8 for F(2x2, 3x3), section 4.2 for F(4x4, 3x3).
_BT = {
    2: np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
    4: np.array(
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        np.float64,
    ),
}


_jit_winograd_input = jax.jit(W.winograd_input, static_argnums=1)
_jit_winograd_input_by_channel = jax.jit(W.winograd_input_by_channel, static_argnums=1)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_vjp(fn, args, cotangent):
    """fn(*args) and its VJP at ``cotangent``, as one program (eagerly, every operation of fn
    compiles on its own for each new shape)."""
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)


@settings(max_examples=15, deadline=None)
@given(**_TILED_MAPS, m=st.sampled_from([2, 4]), bf16=st.booleans())
def test_winograd_input_is_bt_d_b_of_every_tile_rounded_once(
    batch, tiles_h, tiles_w, channels, m, bf16, seed
):
    # Pixels k * 2^e (|k| < 128, 0 <= e <= 4) are exact in bfloat16 (8 significant bits), and
    # each transformed entry is an integer-weighted sum of (m + 2)^2 of them whose weights add
    # up to at most 10 x 10 in absolute value: an integer below 2^18, exact in float32 and
    # float64. So the result must be the float64 B^T d B rounded once to the dtype; rounding
    # the partial sums on the way would differ.
    rng = np.random.default_rng(seed)
    t, bt = m + 2, _BT[m]
    shape = (batch, m * tiles_h, m * tiles_w, channels)
    x = rng.integers(-127, 128, shape) * 2.0 ** rng.integers(0, 5, shape)  # float64
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    out = _jit_winograd_input(jnp.asarray(x, dtype), m)  # one program, not one per op
    assert out.dtype == dtype
    got = np.asarray(out.astype(jnp.float32))
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.empty((t, t, batch, tiles_h, tiles_w, channels))  # [column, row, B, H/m, W/m, C]
    for i in range(tiles_h):
        for j in range(tiles_w):
            d = xp[:, m * i : m * i + t, m * j : m * j + t]  # [B, t, t, C] tile
            v = np.einsum("rp,bpqc,sq->srbc", bt, d, bt)  # (B^T d B)[r, s] at [s, r]
            want[:, :, :, i, j] = v
    want = np.asarray(jnp.asarray(want.reshape(t * t, -1, channels), dtype).astype(jnp.float32))
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # The same tiles stored by channel, [t^2, C, N] (what the kernel gradient reads).
    by_channel = _jit_winograd_input_by_channel(jnp.asarray(x, dtype), m)
    assert by_channel.dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(by_channel.astype(jnp.float32)), np.swapaxes(want, 1, 2)
    )


def test_conv3x3_module_uses_winograd_exactly_where_the_rule_says():
    assert W.use_winograd((16, 32, 32, 128), 128)
    assert W.use_winograd((1, 16, 16, 512), 256)
    assert not W.use_winograd((16, 8, 8, 256), 256)  # small maps
    assert W.use_winograd((64, 16, 16, 64), 64)
    assert W.use_winograd((64, 32, 32, 32), 32)  # 32 channels, on oneDNN's or XLA's products
    assert not W.use_winograd((16, 32, 32, 256), 3)  # narrow output (conv_out)
    assert not W.use_winograd((16, 32, 32, 16), 128)  # narrow input
    assert not W.use_winograd((64, 32, 32, 64), 16)  # narrow output
    assert not W.use_winograd((16, 18, 17, 128), 128)  # odd width: no 2x2 tiling
    # The module with a Winograd-sized input computes the convolution plus bias, with either
    # tile (the same algorithm with or without oneDNN for these two shapes).
    # Transformed inputs: [(m + 2)^2, B H W / m^2, C].
    for shape, tiles in (
        ((1, 16, 16, 128), "f32[16,64,128]"),
        ((16, 16, 16, 64), "f32[36,256,64]"),
    ):
        conv = L.Conv3x3(features=shape[-1])
        x = jax.random.normal(jax.random.key(7), shape)
        params = randomized(conv.init(jax.random.key(8), x)["params"])
        jaxpr = str(jax.make_jaxpr(conv.apply)({"params": params}, x))
        assert "conv_general_dilated" not in jaxpr  # Winograd's products, not XLA's convolution
        assert tiles in jaxpr
        want = conv3x3_f64(np.asarray(x, np.float64), np.asarray(params["kernel"], np.float64))[0]
        want = want + np.asarray(params["bias"], np.float64)
        got = np.asarray(conv.apply({"params": params}, x), np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.max(np.abs(want)))


def test_conv3x3_algorithm_by_platform_dtype_and_shape():
    cases = [
        # (shape, features, strides, dtype, platform, oneDNN usable) -> algorithm
        (((16, 32, 32, 128), 128, 1, jnp.float32, "cpu", True), "winograd4"),
        (((16, 32, 32, 128), 128, 1, jnp.bfloat16, "cpu", True), "winograd"),  # F(4x4): float32
        (((16, 32, 32, 128), 128, 1, jnp.float32, "cpu", False), "winograd4"),
        (((16, 18, 18, 128), 128, 1, jnp.float32, "cpu", True), "winograd"),  # 18 = 4 * 4 + 2
        (((1, 32, 32, 128), 128, 1, jnp.float32, "cpu", True), "winograd"),  # 64-row products
        (((64, 8, 8, 64), 64, 1, jnp.float32, "cpu", True), "winograd4"),  # 256 rows, oneDNN
        (((64, 8, 8, 64), 64, 1, jnp.float32, "cpu", False), "winograd4"),  # 256 rows, XLA
        (((16, 8, 8, 64), 64, 1, jnp.float32, "cpu", False), "xla"),  # 64-row products
        (((64, 8, 8, 64), 64, 1, jnp.bfloat16, "cpu", True), "onednn"),
        (((16, 8, 8, 256), 256, 1, jnp.bfloat16, "cpu", True), "onednn"),
        (((16, 8, 8, 256), 256, 1, jnp.bfloat16, "cpu", False), "dots"),
        (((16, 8, 8, 256), 256, 1, jnp.float32, "cpu", True), "onednn"),  # 64-row products
        (((16, 8, 8, 256), 256, 1, jnp.float32, "cpu", False), "xla"),
        (((16, 32, 32, 128), 128, 2, jnp.float32, "cpu", True), "onednn"),  # downsampling
        (((16, 32, 32, 128), 128, 2, jnp.float32, "cpu", False), "xla"),
        (((16, 8, 8, 64), 64, 1, jnp.bfloat16, "cpu", False), "xla"),
        (((64, 32, 32, 32), 32, 1, jnp.float32, "cpu", True), "winograd4"),  # oneDNN products
        (((64, 32, 32, 32), 32, 1, jnp.bfloat16, "cpu", True), "winograd"),
        (((64, 32, 32, 32), 32, 1, jnp.float32, "cpu", False), "winograd4"),  # XLA products
        (((64, 32, 32, 32), 32, 1, jnp.bfloat16, "cpu", False), "winograd"),
        (((64, 32, 32, 16), 32, 1, jnp.float32, "cpu", False), "xla"),  # 16 input channels
        # Accelerators: XLA's convolution, whatever the shape and dtype.
        (((16, 32, 32, 128), 128, 1, jnp.bfloat16, "gpu", True), "xla"),
        (((16, 8, 8, 256), 256, 1, jnp.bfloat16, "tpu", True), "xla"),
    ]
    for args, want in cases:
        assert C.conv3x3_algorithm(*args) == want, args


def test_kernel_grad_chunks_divide_the_batch_into_large_enough_pieces():
    for batch in (1, 2, 7, 16, 32, 64, 96, 512):
        for pixels in (16, 64, 256, 1024, 4096):
            n = C.kernel_grad_chunks(batch, pixels)
            assert 1 <= n <= TUNING.kernel_grad_max_chunks and batch % n == 0
            if n > 1:  # never split below the cache-friendly size
                assert (batch // n) * pixels >= TUNING.kernel_grad_chunk_pixels
    assert C.kernel_grad_chunks(32, 1024) == 16  # the measured case: 2-image chunks


def test_group_count_decides_whether_a_resblock_sees_the_timestep():
    # The timestep embedding is added per channel before norm2; with one channel per group
    # (32 groups on 32 channels) GroupNorm subtracts it again, exactly.
    x = jax.random.normal(jax.random.key(6), (2, 4, 4, 32))
    t1, t2 = (jax.random.normal(jax.random.key(k), (2, 128)) for k in (7, 8))
    for groups, sees_t in ((32, False), (8, True)):
        block = ResnetBlock(32, 0.0, num_groups=groups)
        params = randomized(block.init(jax.random.key(0), x, t1, train=False), std=0.3)
        a, b = (np.asarray(block.apply(params, x, t, train=False)) for t in (t1, t2))
        # Float32 rounding of O(1) values: <= 1e-5 when equal; an embedding that reaches the
        # output changes it by O(0.1) with these weights.
        diff = float(np.max(np.abs(a - b)))
        assert (diff > 1e-2) if sees_t else (diff < 1e-5), (groups, diff)


def test_attention_block_matches_float64_reference():
    block = AttnBlock()
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 32))
    params = randomized(block.init(jax.random.key(0), x), std=0.3)
    got = np.asarray(block.apply(params, x))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    xn = np.asarray(x, np.float64)
    xg = xn.reshape(2, 16, 32, 1)
    h = (xg - xg.mean((1, 3), keepdims=True)) / np.sqrt(xg.var((1, 3), keepdims=True) + 1e-6)
    h = h.reshape(2, 16, 32) * p["norm"]["scale"] + p["norm"]["bias"]
    q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in "qkv")
    w = q @ k.transpose(0, 2, 1) / np.sqrt(32)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = (w @ v) @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    ref = xn + o.reshape(2, 4, 4, 32)
    # Sums of 32 O(1) float32 products: ~1e-6 relative error, 1e-4 absolute is ample.
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 40),
    offset=st.sampled_from([0.0, -80.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_softmax_and_its_vjp_match_the_float64_closed_form(rows, cols, offset, seed):
    rng = np.random.default_rng(seed)
    # Logits with an offset softmax must ignore, rounded to float32 first: the reference is the
    # float64 closed form of the float32 logits, so only the computation's own error remains.
    s = (rng.normal(0.0, 3.0, (rows, cols)) + offset).astype(np.float32).astype(np.float64)
    g = rng.normal(0.0, 1.0, (rows, cols)).astype(np.float32).astype(np.float64)
    p, (ds,) = _value_and_vjp(
        M.softmax, (jnp.asarray(s, jnp.float32),), jnp.asarray(g, jnp.float32)
    )
    e = np.exp(s - s.max(-1, keepdims=True))
    want_p = e / e.sum(-1, keepdims=True)
    # The Jacobian diag(p) - p p^T applied to g, row by row.
    jac = np.eye(cols) * want_p[:, None, :] - want_p[..., None] * want_p[:, None, :]
    want_ds = np.einsum("ri,rij->rj", g, jac)
    # float32 s - max is within |s - max| 2^-24 (< 2e-6 here: |s - max| < 30), which moves p by
    # that much relative; exp, the sum of <= 40 terms and the division add a few ulps. The
    # absolute floors cover entries whose p or ds is itself near the float32 noise of the row.
    np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ds, want_ds, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, atol=1e-5)


def test_dense_result_dtype_keeps_the_float32_sum_unrounded():
    x = jax.random.normal(jax.random.key(7), (3, 5, 16))
    rounded, kept = L.Dense(8, jnp.bfloat16), L.Dense(8, jnp.bfloat16, result_dtype=jnp.float32)
    params = randomized(rounded.init(jax.random.key(0), x), std=0.3)
    assert jax.tree.structure(params) == jax.tree.structure(kept.init(jax.random.key(0), x))
    got = kept.apply(params, x)
    assert got.dtype == jnp.float32 and rounded.apply(params, x).dtype == jnp.bfloat16
    # The bfloat16 result is the float32 one rounded once.
    np.testing.assert_array_equal(rounded.apply(params, x), got.astype(jnp.bfloat16))
    # float32 accumulation of products of the same bfloat16 operands: within ~1e-6 of float64.
    p = params["params"]
    x16, k16 = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (x, p["kernel"]))
    want = x16 @ k16 + np.asarray(p["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)


def test_dropout_only_when_training(tiny):
    model, params, x, t, _ = tiny
    apply = jax.jit(
        lambda p, r, train: model.apply({"params": p}, x, t, train=train, rngs={"dropout": r}),
        static_argnums=2,
    )
    eval_a = apply(params, jax.random.key(10), False)
    eval_b = apply(params, jax.random.key(11), False)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_a = apply(params, jax.random.key(10), True)
    train_b = apply(params, jax.random.key(11), True)
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-3
    assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-3
    with pytest.raises(Exception, match="dropout"):  # flax: no "dropout" rng given
        model.apply({"params": params}, x, t, train=True)


def test_bfloat16_compute_close_to_float32(tiny):
    model, params, x, t, _ = tiny
    bf16 = UNet(**TINY, out_channels=CH, dtype=jnp.bfloat16)
    out32, out16 = jax.jit(
        lambda p: tuple(m.apply({"params": p}, x, t, train=False) for m in (model, bf16))
    )(params)
    assert out16.dtype == jnp.float32
    assert jax.tree.map(lambda a: a.dtype, params) == jax.tree.map(lambda _: jnp.float32, params)
    # bfloat16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). Rounding errors of the ~10
    # layers on the longest path add up to ~1% (measured 0.8-1.2% on tiny models); 5% leaves
    # margin while a wrong dtype on a branch or a bfloat16 overflow gives O(1).
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 5e-2, rel


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_bfloat16_init_and_apply_at_batch_1_and_2(tiny, batch, jitted):
    # bfloat16 init killed the process (SIGILL in oneDNN's matmul) on AVX2 CPUs: init and apply
    # must run on every CPU, eager and jitted, at the smallest batches (the timestep
    # embedding's products are then 1 or 2 rows). The same tolerance as above, against float32.
    model, params, x, t, _ = tiny
    bf16 = UNet(**TINY, out_channels=CH, dtype=jnp.bfloat16)
    x, t = x[:batch], t[:batch]
    init = lambda: bf16.init({"params": jax.random.key(0)}, x, t, train=False)  # noqa: E731
    apply = lambda p: bf16.apply({"params": p}, x, t, train=False)  # noqa: E731
    init, apply = (jax.jit(init), jax.jit(apply)) if jitted else (init, apply)
    fresh = init()["params"]
    assert jax.tree.map(lambda a: a.shape, fresh) == jax.tree.map(lambda a: a.shape, params)
    out16 = apply(params)
    out32 = model.apply({"params": params}, x, t, train=False)
    assert out16.shape == (batch, SIZE, SIZE, CH) and out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 5e-2, rel


def test_class_conditioning_and_null_class(tiny):
    _, _, x, t, _ = tiny
    model = UNet(**TINY, out_channels=CH, num_classes=3)
    params = randomized(init_params(model, jax.random.key(0), SIZE, CH))
    assert params["class_embed"]["embedding"].shape == (4, 4 * TINY["ch"])  # + null row
    fwd = jax.jit(lambda y: model.apply({"params": params}, x, t, y, train=False))
    np.testing.assert_array_equal(np.asarray(fwd(None)), np.asarray(fwd(jnp.array([3, 3]))))
    assert float(jnp.max(jnp.abs(fwd(jnp.array([0, 1])) - fwd(jnp.array([2, 2]))))) > 1e-3
    # Concrete labels are checked (before any computation, so eager apply raises at once).
    with pytest.raises(ValueError, match="class label 4 out of range"):
        model.apply({"params": params}, x, t, jnp.array([0, 4]), train=False)
    with pytest.raises(ValueError, match="class label -1"):
        model.apply({"params": params}, x, t, jnp.array([-1, 0]), train=False)
    # Under jit they cannot raise; the bad sample's output becomes NaN instead of wrapping.
    out = np.asarray(fwd(jnp.array([-1, 0])))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_one_trace_per_shape(tiny):
    model, params, _, _, _ = tiny
    traces = []

    @jax.jit
    def fwd(p, x, t):
        traces.append(x.shape)
        return model.apply({"params": p}, x, t, train=False)

    for seed in range(3):  # new values, same shape: no retrace
        x = jax.random.normal(jax.random.key(seed), (2, SIZE, SIZE, CH))
        fwd(params, x, jnp.array([seed, 10 * seed], jnp.int32)).block_until_ready()
    assert len(traces) == 1
    fwd(params, jnp.zeros((3, SIZE, SIZE, CH)), jnp.zeros((3,), jnp.int32))  # new batch size
    assert len(traces) == 2


@pytest.mark.parametrize(
    ("kwargs", "shape", "y", "match"),
    [
        (
            {},
            (1, 9, 9, 1),
            None,
            r"image size 9x9 not divisible by 2\*\*\(len\(ch_mult\)-1\) = 2",
        ),
        (
            {"attn_resolutions": (16, 8)},
            (1, 32, 32, 1),
            None,
            r"resolutions \[8\] never .*\[32, 16\]",
        ),
        ({"ch": 48}, (1, 32, 32, 1), None, r"channel counts \[48\] .* 32 GroupNorm groups"),
        ({"ch_mult": (1, 2, 2, 2)}, (1, 12, 12, 1), None, "image size 12x12 .* = 8"),
        ({}, (1, 32, 32, 1), jnp.array([0]), "unconditional"),
        ({"dtype": jnp.float16}, (1, 32, 32, 1), None, "unsupported dtype float16"),
    ],
)
def test_bad_input_raises_named_value_error(kwargs, shape, y, match):
    cfg = dict(ch=32, ch_mult=(1, 2), attn_resolutions=(), out_channels=1)
    model = UNet(**{**cfg, **kwargs})
    x = jnp.zeros(shape)
    t = jnp.zeros((shape[0],), jnp.int32)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y, train=False))


@settings(max_examples=12, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 5)),
    bf16=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_add_per_sample_and_its_gradients_match_float64(shape, bf16, seed):
    # h + t over pixels; the t gradient (a sum over pixels, a product with ones in bfloat16) is
    # exact up to float32 accumulation, then rounded once to the compute dtype.
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    rng = np.random.default_rng(seed)
    b, _, _, c = shape
    h, g = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))
    t = jnp.asarray(rng.normal(size=(b, c)), dtype)
    out, (dh, dt) = _value_and_vjp(E.add_per_sample, (h, t), g)
    assert out.dtype == dh.dtype == dt.dtype == dtype
    h64, t64, g64 = (np.asarray(a, np.float64) for a in (h, t, g))
    want = h64 + t64[:, None, None, :]
    unit = 2.0**-8 if bf16 else 2.0**-24  # unit roundoff of the result's dtype
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=unit, atol=0)
    np.testing.assert_array_equal(np.asarray(dh, np.float64), g64)
    want_dt = g64.sum(axis=(1, 2))
    # float32 accumulation of H*W terms (<= 81 * 2^-24 relative to sum|g|), then one rounding.
    tol = unit * np.abs(want_dt) + 81 * 2.0**-24 * np.abs(g64).sum(axis=(1, 2))
    assert np.all(np.abs(np.asarray(dt, np.float64) - want_dt) <= tol)
