"""Noise-prediction networks: the DDPM U-Net and helpers to build it from a config."""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

from diffjax import choices
from diffjax.core.diffusion import model_output_channels
from diffjax.kernels import cpu_runtime
from diffjax.models.unet import NUM_GROUPS, UNet, timestep_embedding

__all__ = ["UNet", "create_model", "init_params", "timestep_embedding"]


@functools.cache
def _notice(line: str) -> None:
    # Once per process: a run builds its model more than once (training, evaluation, sampling).
    logging.getLogger("diffjax").warning(line)


def create_model(config: Any) -> UNet:
    """Build the U-Net from config.model.*, config.data.channels and config.diffusion.var_type.

    ``model.dtype = "bfloat16"`` computes in float32 on a CPU without bfloat16 arithmetic
    (``cpu_runtime.effective_dtype``: there it would be no faster), with a one-line notice;
    ``UNet(dtype=jnp.bfloat16)`` built directly computes in bfloat16 everywhere.
    """
    m = config.model
    if m.dtype not in choices.DTYPES:
        raise ValueError(f"unknown model dtype {m.dtype!r}; allowed: {', '.join(choices.DTYPES)}")
    dtype = cpu_runtime.effective_dtype(m.dtype, jax.default_backend())
    if dtype != m.dtype:
        _notice(cpu_runtime.bfloat16_fallback_notice())
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        resamp_with_conv=m.resamp_with_conv,
        out_channels=model_output_channels(config.data.channels, config.diffusion.var_type),
        num_classes=m.num_classes or None,
        dtype=getattr(jnp, dtype),  # jnp.float32 or jnp.bfloat16
        # Run directories written before these fields existed used the paper's 32 groups and
        # the tuned kernels.
        num_groups=m.get("num_groups", NUM_GROUPS),
        kernels=m.get("kernels", "tuned"),
    )


def init_params(model: UNet, rng: jax.Array, image_size: int, channels: int) -> Any:
    """Initial float32 parameters of ``model`` for [1, image_size, image_size, channels] images."""
    x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)  # [1, H, W, C]
    t = jnp.zeros((1,), jnp.int32)
    # One jitted program: much faster than dispatching every initialiser op by op.
    init = jax.jit(lambda r: model.init({"params": r}, x, t, train=False)["params"])
    return init(rng)
