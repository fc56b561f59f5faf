"""Every tuning threshold of the tuned kernels, in one table.

Each value was chosen by timing whole train steps on the 2-core CPUs of ``bench/README.md``
(section "Where the time goes and what was changed", one A/B per entry) or, for the GPU entries,
on one H100 (section "GPU: one H100"). The kernels read them from here and nowhere else; the
measurements live in bench/README.md, not in code comments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

__all__ = ["TUNING", "Tuning"]


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Where each tuned algorithm takes over (bench/README.md, section named per field)."""

    # Winograd F(2x2, 3x3): maps of at least this many pixels a side ("Winograd"), and at least
    # this many input and output channels, whether the products run on oneDNN or XLA
    # ("Winograd for 32 channels and 8x8 maps without oneDNN").
    winograd_min_size: int = 16
    winograd_min_channels: int = 32
    # Winograd F(4x4, 3x3): only in these compute dtypes (bfloat16 loses too much accuracy to
    # its larger transform weights), on maps of at least this size, where its products have at
    # least this many rows (B H W / 16) ("Winograd F(4x4, 3x3)").
    winograd4_dtypes: tuple[Any, ...] = (jnp.dtype(jnp.float32),)
    winograd4_min_size: int = 8
    winograd4_min_rows: int = 256
    # The libraries running Winograd's products ("xla", "onednn") for which its kernel gradient
    # reads the transformed input stored channel by channel, [t^2, C, N]: XLA:CPU then gives
    # that product to YNNPACK instead of its own transposed-operand kernel ("Winograd's kernel
    # gradient from the input stored by channel").
    winograd_grad_by_channel: tuple[str, ...] = ("xla",)
    # bfloat16 3x3 convolutions with at least this many input channels run as nine bfloat16
    # products: XLA:CPU computes bfloat16 convolutions in float32 ("bfloat16 convolutions").
    bf16_dot_conv_min_channels: int = 128
    # Kernel gradients of XLA:CPU's default (YNNPACK) convolutions are summed over batch chunks
    # of at least this many pixels, at most this many chunks ("chunked kernel gradients").
    kernel_grad_chunk_pixels: int = 2048
    kernel_grad_max_chunks: int = 32
    # Platforms whose XLA convolutions return the compute dtype instead of float32 (cuDNN would
    # otherwise run bfloat16 convolutions as TF32 on float32 copies; "GPU: one H100").
    conv_result_in_compute_dtype: tuple[str, ...] = ("gpu",)
    # Platforms where GroupNorm's per-group statistics reach the channels through a matrix
    # product, which XLA:CPU keeps materialised ("GroupNorm"); elsewhere a repeat, which XLA:GPU
    # fuses into its consumers.
    group_expand_by_product: tuple[str, ...] = ("cpu",)
    # (platform, compute dtype) pairs whose per-pixel sums (the gradient of the timestep
    # projection) run as a product with a vector of ones ("bfloat16 reductions").
    pixel_sum_by_product: tuple[tuple[str, Any], ...] = (("cpu", jnp.dtype(jnp.bfloat16)),)


TUNING = Tuning()
