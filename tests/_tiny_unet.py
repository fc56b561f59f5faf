"""A tiny U-Net's loss for tests that compare two ways of computing the same network."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.models import init_params
from diffjax.models.unet import UNet


def tiny_unet_loss(dtype: Any = jnp.float32, kernels: str = "tuned") -> tuple[Callable, Any]:
    """(loss, params): loss(params) = sum of squares of a two-level U-Net's output (attention at
    4x4, one channel) on four fixed 8x8 images at timesteps 0-999; params drawn N(0, 0.2^2), as
    the zero-initialised output convolutions would hide everything before them. ``kernels``:
    the ``model.kernels`` switch (``diffjax.kernels``)."""
    model = UNet(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        out_channels=1,
        dtype=dtype,
        kernels=kernels,
    )
    leaves, tree = jax.tree.flatten(init_params(model, jax.random.key(0), 8, 1))
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = jax.tree.unflatten(
        tree, [0.2 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    )
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))  # [B, H, W, C]
    t = jnp.array([0, 10, 500, 999])

    def loss(p):
        return jnp.sum(model.apply({"params": p}, x, t, train=False) ** 2)

    return loss, params
