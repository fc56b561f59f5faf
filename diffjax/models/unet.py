"""The DDPM noise-prediction U-Net (Ho et al. 2020, appendix B), in flax.linen.

The layout follows the reference implementation ``diffusion_tf/models/unet.py`` of Ho et al.
2020: a PixelCNN++-style Wide-ResNet U-Net with a sinusoidal timestep embedding (Vaswani et al.
2017 sec. 3.5), group normalisation (Wu & He 2018) and single-head self-attention at chosen
resolutions. The CIFAR-10 configuration (``ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
attn_resolutions=(16,)``, 3 channels) has exactly 35,746,307 parameters, as the reference model;
the 256x256 configuration (``ch_mult=(1, 1, 2, 2, 4, 4)``) has 113,673,219.

Parameter tree (``params[...]``; every leaf float32; Dense kernels are ``[in, out]``, Conv kernels
``[kh, kw, in, out]`` (HWIO), GroupNorm leaves ``scale``/``bias`` of shape ``[C]``)::

    temb_dense_0       Dense ch -> 4ch                   {kernel, bias}
    temb_dense_1       Dense 4ch -> 4ch                  {kernel, bias}
    class_embed        Embed (num_classes + 1) x 4ch     {embedding}   (only if num_classes > 0)
    conv_in            Conv3x3 C_in -> ch                {kernel, bias}
    down_{l}_block_{i} ResnetBlock, l < len(ch_mult), i < num_res_blocks
    down_{l}_attn_{i}  AttnBlock after down_{l}_block_{i} if its resolution is in attn_resolutions
    down_{l}_downsample  {conv: {kernel, bias}}  stride-2 Conv3x3, l < len(ch_mult) - 1,
                       only with resamp_with_conv (else average pooling, no parameters)
    mid_block_1, mid_attn, mid_block_2
    up_{l}_block_{i}   ResnetBlock, i < num_res_blocks + 1, input = concat(h, skip) on channels
    up_{l}_attn_{i}    AttnBlock, as in the down path
    up_{l}_upsample    {conv: {kernel, bias}}  nearest x2 then Conv3x3, l > 0, only with
                       resamp_with_conv (else nearest only, no parameters)
    norm_out           GroupNorm {scale, bias}
    conv_out           Conv3x3 ch -> out_channels, zero-initialised

    ResnetBlock: norm1 {scale, bias}, conv1 Conv3x3, temb_proj Dense 4ch -> out,
                 norm2 {scale, bias}, conv2 Conv3x3 (zero-init),
                 nin_shortcut Dense in -> out (a 1x1 conv; only when in != out)
    AttnBlock:   norm {scale, bias}, q, k, v, proj_out: Dense C -> C (1x1 convs; proj_out zero-init)

The "resolution" of a feature map is its height, as in the reference implementation. Skip
connections are pushed after ``conv_in``, after every down resblock (or its attention) and after
every downsample, and popped in reverse by the up path (``num_res_blocks + 1`` per level).

Normalisation always uses 32 groups (the paper's value), so every channel count (``ch`` and each
``ch * mult``) must be divisible by 32 (e.g. ch=32 or 64 for small models); statistics are
computed in float32 whatever the compute dtype. Parameters are always float32; ``dtype`` only sets
the compute dtype of convolutions, dense layers and attention (products accumulate in float32,
softmax in float32); the output is cast back to float32. The layers themselves (and why they are
written the way they are: speed on XLA:CPU) are in :mod:`diffjax.models.layers`,
:mod:`diffjax.kernels.winograd` and :mod:`diffjax.kernels.normalization`.

Class conditioning (for classifier-free guidance, Ho & Salimans 2022): ``class_embed`` has
``num_classes + 1`` rows, the last (id ``num_classes``) being the null class; ``y=None`` on a
conditional model means "null class" for the whole batch. Labels outside ``[0, num_classes]`` raise
a ValueError when they are concrete; under ``jax.jit`` they are tracers and cannot be checked:
there they give NaN outputs for the affected samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import choices
from diffjax import kernels as K
from diffjax.models import layers as L
from diffjax.models.geometry import unet_problems

NUM_GROUPS = 32  # GroupNorm groups, as the paper.
NORM_EPS = 1e-6  # tf.contrib.layers.group_norm default, used by the reference model.


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal timestep embedding (Vaswani et al. 2017 sec. 3.5; Ho et al. 2020 appendix B).

    emb[:, j] = sin(t w_j), emb[:, half + j] = cos(t w_j), w_j = exp(-j log(10000) / (half - 1))
    for j < half = dim // 2; a zero column is appended when ``dim`` is odd.

    Args:
      t: timesteps, shape [B] (any real or integer dtype).
      dim: embedding width (>= 4 so that half - 1 > 0).

    Returns:
      float32 [B, dim].
    """
    if dim < 4:
        raise ValueError(f"timestep embedding dim must be >= 4, got {dim}")
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got shape {t.shape}")
    half = dim // 2
    scale = math.log(10000.0) / (half - 1)
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -scale)  # [half]
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)  # [B, 2 * half]
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _norm(
    dtype: Any, kernels: str, name: str, groups: int = NUM_GROUPS, swish: bool = False
) -> L.GroupNorm:
    return L.GroupNorm(groups, dtype, NORM_EPS, swish, kernels, name=name)


class ResnetBlock(nn.Module):
    """Wide-ResNet block with additive timestep conditioning (Ho et al. 2020 appendix B)."""

    out_ch: int
    dropout: float
    dtype: Any = jnp.float32
    num_groups: int = NUM_GROUPS
    kernels: str = "tuned"

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
        # x: [B, H, W, Cin], temb: [B, 4ch]
        dt, kn, g = self.dtype, self.kernels, self.num_groups
        h = _norm(dt, kn, "norm1", g, swish=True)(x)
        h = L.Conv3x3(self.out_ch, dt, kernels=kn, name="conv1")(h)  # [B, H, W, out]
        t = L.Dense(self.out_ch, dt, kernels=kn, name="temb_proj")(nn.swish(temb))  # [B, out]
        h = K.select(kn).add_per_sample(h, t)
        h = _norm(dt, kn, "norm2", g, swish=True)(h)
        h = L.Dropout(self.dropout, kn)(h, train=train)
        h = L.Conv3x3(self.out_ch, dt, zero=True, kernels=kn, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = L.Dense(self.out_ch, dt, kernels=kn, name="nin_shortcut")(x)
        return x.astype(dt) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (Vaswani et al. 2017 eq. 1), residual."""

    dtype: Any = jnp.float32
    num_groups: int = NUM_GROUPS
    kernels: str = "tuned"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        dt, kn = self.dtype, self.kernels
        h = _norm(dt, kn, "norm", self.num_groups)(x).reshape(b, hh * ww, c)  # [B, N, C]
        # q, k, v stay float32 until the attention rounds them to dtype (after scaling q).
        q, k, v = (L.Dense(c, dt, kernels=kn, result_dtype=jnp.float32, name=n)(h) for n in "qkv")
        o = K.select(kn).attention(q, k, v, dt)  # softmax(q k^T / sqrt(C)) v  [B, N, C]
        o = L.Dense(c, dt, zero=True, kernels=kn, name="proj_out")(o).reshape(b, hh, ww, c)
        return x.astype(dt) + o


class Downsample(nn.Module):
    """Halve the resolution: stride-2 Conv3x3, or 2x2 average pooling."""

    with_conv: bool
    dtype: Any = jnp.float32
    kernels: str = "tuned"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            return L.Conv3x3(x.shape[-1], self.dtype, 2, kernels=self.kernels, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then Conv3x3 if ``with_conv``."""

    with_conv: bool
    dtype: Any = jnp.float32
    kernels: str = "tuned"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        x = x.reshape(b, 2 * h, 2 * w, c)  # [B, 2H, 2W, C] nearest neighbour
        if self.with_conv:
            x = L.Conv3x3(c, self.dtype, kernels=self.kernels, name="conv")(x)
        return x


def _check_labels(y: jax.Array, num_classes: int) -> None:
    """Raise on concrete labels outside [0, num_classes] (num_classes is the null id)."""
    if isinstance(y, jax.core.Tracer):
        return  # under jit the values are unknown; jnp.take clamps them
    y_np = np.asarray(y)
    bad = y_np[(y_np < 0) | (y_np > num_classes)]
    if bad.size:
        raise ValueError(
            f"class label {int(bad.flat[0])} out of range; allowed: 0..{num_classes - 1}, "
            f"or {num_classes} for the null class"
        )


class UNet(nn.Module):
    """DDPM noise-prediction network eps_theta(x_t, t[, y]) (Ho et al. 2020 eq. 14, appendix B).

    Fields:
      ch: base channel count. ch_mult: per-level channel multipliers.
      num_res_blocks: resblocks per level in the down path (the up path has one more).
      attn_resolutions: feature-map heights at which self-attention follows each resblock.
      dropout: dropout rate inside resblocks (applied only with ``train=True``, rng "dropout").
      resamp_with_conv: convolutional down/upsampling instead of avg-pool / nearest only.
      out_channels: C for eps/x0/v prediction, 2C with a learned variance.
      num_classes: 0 or None for an unconditional model.
      dtype: compute dtype (float32 or bfloat16); parameters are float32 regardless.
      num_groups: GroupNorm groups (32 in the paper); ch and every ch * mult must be multiples.
        With one channel per group (e.g. ch=32), GroupNorm removes the per-channel timestep
        and class embedding a resblock adds before its second norm; fewer groups keep it.
      kernels: how the layers' operations are computed (``diffjax.kernels``): "tuned" (the
        default), "plain" (the lax/jax.nn reference) or "onednn".
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    out_channels: int = 3
    num_classes: int | None = None
    dtype: Any = jnp.float32
    num_groups: int = NUM_GROUPS
    kernels: str = "tuned"

    def _validate(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected images [B, H, W, C], got shape {x.shape}")
        if not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise ValueError(f"num_groups = {self.num_groups!r}; allowed: an integer >= 1")
        problems = unet_problems(
            x.shape[1], x.shape[2], self.ch, self.ch_mult, self.attn_resolutions, self.num_groups
        )
        if problems:
            raise ValueError(problems[0][1])
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout rate {self.dropout} not in [0, 1)")
        dtype = jnp.dtype(self.dtype)
        if dtype.name not in choices.DTYPES:
            raise ValueError(f"unsupported dtype {dtype}; allowed: {', '.join(choices.DTYPES)}")
        K.check_kernels(self.kernels)

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool
    ) -> jax.Array:
        """Predict the network output for x_t [B, H, W, C] at timesteps t int32 [B]."""
        self._validate(x)
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape [{x.shape[0]}], got {t.shape}")
        if self.num_classes and y is not None:
            _check_labels(y, self.num_classes)
        elif y is not None:
            raise ValueError("labels y given to an unconditional model (num_classes=0)")
        dt, kn, g = self.dtype, self.kernels, self.num_groups
        nr = len(self.ch_mult)

        temb = timestep_embedding(t, self.ch)  # [B, ch] float32
        temb = L.Dense(4 * self.ch, dt, kernels=kn, name="temb_dense_0")(temb)
        temb = L.Dense(4 * self.ch, dt, kernels=kn, name="temb_dense_1")(nn.swish(temb))  # [B, 4ch]
        if self.num_classes:
            if y is None:
                y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)  # null class
            embed = nn.Embed(self.num_classes + 1, 4 * self.ch, name="class_embed")
            # Under jit labels cannot be checked: map invalid ones past the table, where the
            # embedding lookup yields NaN, so that they poison the output instead of wrapping.
            y = jnp.where((y >= 0) & (y <= self.num_classes), y, self.num_classes + 1)
            temb = temb + embed(y).astype(temb.dtype)

        hs = [L.Conv3x3(self.ch, dt, kernels=kn, name="conv_in")(x)]  # [B, H, W, ch]
        for level in range(nr):
            out_ch = self.ch * self.ch_mult[level]
            for i in range(self.num_res_blocks):
                name = f"down_{level}_block_{i}"
                h = ResnetBlock(out_ch, self.dropout, dt, g, kn, name=name)(
                    hs[-1], temb, train=train
                )
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(dt, g, kn, name=f"down_{level}_attn_{i}")(h)
                hs.append(h)
            if level != nr - 1:
                down = Downsample(self.resamp_with_conv, dt, kn, name=f"down_{level}_downsample")
                hs.append(down(hs[-1]))

        h = hs[-1]
        c = h.shape[-1]
        h = ResnetBlock(c, self.dropout, dt, g, kn, name="mid_block_1")(h, temb, train=train)
        h = AttnBlock(dt, g, kn, name="mid_attn")(h)
        h = ResnetBlock(c, self.dropout, dt, g, kn, name="mid_block_2")(h, temb, train=train)

        for level in reversed(range(nr)):
            out_ch = self.ch * self.ch_mult[level]
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                name = f"up_{level}_block_{i}"
                h = ResnetBlock(out_ch, self.dropout, dt, g, kn, name=name)(h, temb, train=train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(dt, g, kn, name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Upsample(self.resamp_with_conv, dt, kn, name=f"up_{level}_upsample")(h)
        assert not hs

        h = _norm(dt, kn, "norm_out", g, swish=True)(h)
        h = L.Conv3x3(self.out_channels, dt, zero=True, kernels=kn, name="conv_out")(h)
        return h.astype(jnp.float32)
