"""A tiny U-Net's loss for tests that compare two ways of computing the same network."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import init_params
from diffjax.models.unet import UNet


def randomized(params: Any, seed: int = 1, std: float = 0.2) -> Any:
    """Every leaf of ``params`` replaced by N(0, std^2) noise: the zero-initialised output
    convolutions would otherwise make the network's output 0 and hide everything before them.
    One draw cut into the leaves on the host: drawing leaf by leaf compiles a program per leaf
    shape (seconds for a U-Net), and so does one program of all the draws."""
    leaves, tree = jax.tree.flatten(params)
    sizes = [math.prod(p.shape) for p in leaves]
    flat = np.asarray(std * jax.random.normal(jax.random.key(seed), (sum(sizes),)))
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    new = [jnp.asarray(v.reshape(p.shape), p.dtype) for v, p in zip(parts, leaves, strict=True)]
    return jax.tree.unflatten(tree, new)


_TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), out_channels=1)


@functools.cache
def _tiny_params() -> Any:
    # The parameters are float32 and the same tree whatever the compute dtype and kernels.
    return randomized(init_params(UNet(**_TINY), jax.random.key(0), 8, 1), seed=5)


def tiny_unet_loss(dtype: Any = jnp.float32, kernels: str = "tuned") -> tuple[Callable, Any]:
    """(loss, params): loss(params) = sum of squares of a two-level U-Net's output (attention at
    4x4, one channel) on four fixed 8x8 images at timesteps 0-999; params drawn N(0, 0.2^2), as
    the zero-initialised output convolutions would hide everything before them. ``kernels``:
    the ``model.kernels`` switch (``diffjax.kernels``)."""
    model = UNet(**_TINY, dtype=dtype, kernels=kernels)
    params = _tiny_params()
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))  # [B, H, W, C]
    t = jnp.array([0, 10, 500, 999])

    def loss(p):
        return jnp.sum(model.apply({"params": p}, x, t, train=False) ** 2)

    return loss, params
