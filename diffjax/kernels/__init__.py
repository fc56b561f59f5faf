"""The kernels behind the U-Net's layers, behind one switch: ``model.kernels``.

The network (``diffjax.models``) is written in terms of six operations (a dense layer, a 3x3
convolution, group normalisation, attention, a per-sample bias, a dropout mask); ``select``
returns the implementation of all six for one setting of the switch (``diffjax.choices.KERNELS``):

- ``"tuned"`` (the default): ``diffjax.kernels.tuned``, hand-written gradients and per-platform
  algorithms (Winograd convolutions, fused GroupNorm + swish, float32-accumulating products)
  that make the CPU train step fast; GPUs get what they need (bfloat16 convolution results).
- ``"plain"``: ``diffjax.kernels.plain``, ``lax`` and ``jax.nn`` as in the papers, autodiff
  gradients. The reference the tuned kernels are tested against (tests/test_kernels.py), and
  the path where nothing hand-written runs; ``cpu_runtime.configure`` then changes no setting.
- ``"onednn"``: the tuned kernels with oneDNN's convolutions and products on AVX-512 CPUs
  (``diffjax.kernels.onednn``), where the CPU, jaxlib and a probe allow it; elsewhere the same
  as ``"tuned"``.

The backend a program is for is read here and nowhere else (``jax.default_backend()`` when the
layer is traced). Tuning thresholds are in ``diffjax.kernels.tuning``; the process-wide XLA:CPU
settings in ``diffjax.kernels.cpu_runtime``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from diffjax.choices import KERNELS

__all__ = ["KERNELS", "Kernels", "check_kernels", "describe", "select"]


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One implementation of each operation the U-Net's layers are made of.

    dense(x [..., K], kernel f32 [K, N], dtype) -> f32 [..., N]
    conv3x3(x [B, H, W, C], kernel f32 [3, 3, C, O], strides, dtype) -> [B, H', W', O]
    group_norm(x [B, ..., C], scale f32 [C], bias f32 [C], groups, epsilon, dtype, swish) -> dtype
    attention(q, k, v f32 [B, N, C], dtype) -> [B, N, C] dtype
    add_per_sample(h [B, H, W, C], t [B, C]) -> h.dtype
    dropout_mask(key, shape, rate) -> bool keep-mask
    """

    name: str
    platform: str
    dense: Callable
    conv3x3: Callable
    group_norm: Callable
    attention: Callable
    add_per_sample: Callable
    dropout_mask: Callable


def check_kernels(name: str) -> None:
    """Raise ValueError naming ``name`` and the allowed values unless it is one of KERNELS."""
    if name not in KERNELS:
        raise ValueError(f"kernels={name!r}; allowed: {', '.join(KERNELS)}")


def _plain(platform: str) -> Kernels:
    from diffjax.kernels import plain

    ops = {f: getattr(plain, f) for f in _OPS}
    return Kernels("plain", platform, **ops)


def _tuned(platform: str, onednn: bool) -> Kernels:
    from diffjax.kernels import tuned

    p = functools.partial
    return Kernels(
        "onednn" if onednn else "tuned",
        platform,
        dense=p(tuned.dense, onednn=onednn),
        conv3x3=p(tuned.conv3x3, platform=platform, onednn=onednn),
        group_norm=p(tuned.group_norm, platform=platform),
        attention=p(tuned.attention, onednn=onednn),
        add_per_sample=p(tuned.add_per_sample, platform=platform),
        dropout_mask=tuned.dropout_mask,
    )


_OPS = ("dense", "conv3x3", "group_norm", "attention", "add_per_sample", "dropout_mask")
# switch value -> platform -> Kernels. oneDNN calls only exist on XLA:CPU.
_BUILD = {
    "tuned": lambda platform: _tuned(platform, onednn=False),
    "plain": _plain,
    "onednn": lambda platform: _tuned(platform, onednn=platform == "cpu"),
}


@functools.cache
def _select(name: str, platform: str) -> Kernels:
    return _BUILD[name](platform)


def select(name: str = "tuned", platform: str | None = None) -> Kernels:
    """The kernels of switch value ``name`` for ``platform`` (default: JAX's default backend,
    the one a program traced now runs on)."""
    check_kernels(name)
    if platform is None:
        import jax

        platform = jax.default_backend()
    return _select(name, platform)


def describe(name: str, dtype: str = "float32") -> str:
    """One line for the entry points: which kernels a CPU program of ``dtype`` compute runs."""
    check_kernels(name)
    if name == "plain":
        return "CPU kernels: plain lax/jax.nn operations, autodiff gradients (kernels=plain)"
    from diffjax.kernels import onednn

    return onednn.describe(dtype, requested=name == "onednn")
