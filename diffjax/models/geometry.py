"""The shape rules of the U-Net, stated once: for ``UNet`` (on its input) and for config
validation (before anything compiles).

The U-Net halves the resolution ``len(ch_mult) - 1`` times, attends at the heights listed in
``attn_resolutions``, and normalises ``ch`` and every ``ch * mult`` channels in ``num_groups``
groups (Ho et al. 2020 appendix B).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["unet_problems"]


def unet_problems(
    height: int,
    width: int,
    ch: int,
    ch_mult: Sequence[int],
    attn_resolutions: Sequence[int],
    num_groups: int,
) -> list[tuple[str, str]]:
    """Every violated rule as (config field, one-line message naming the values); [] if none."""
    problems = []
    factor = 2 ** (len(ch_mult) - 1)
    if height % factor or width % factor:
        problems.append(
            (
                "data.image_size",
                f"image size {height}x{width} not divisible by 2**(len(ch_mult)-1) = {factor} "
                f"(ch_mult={tuple(ch_mult)})",
            )
        )
    else:
        occurring = [height // 2**i for i in range(len(ch_mult))]
        missing = [r for r in attn_resolutions if r not in occurring]
        if missing:
            problems.append(
                (
                    "model.attn_resolutions",
                    f"attention resolutions {missing} never occur for image height {height}; "
                    f"occurring resolutions: {occurring}",
                )
            )
    bad = sorted({c for c in (ch, *(ch * m for m in ch_mult)) if c % num_groups})
    if bad:
        problems.append(
            (
                "model.ch",
                f"channel counts {bad} (ch={ch}, ch_mult={tuple(ch_mult)}) are not divisible by "
                f"the {num_groups} GroupNorm groups (num_groups)",
            )
        )
    return problems
