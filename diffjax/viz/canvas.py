"""Figure plumbing shared by the plots: fixed pixel sizes, image grids, PNG/SVG output.

Figures are ``matplotlib.figure.Figure`` objects drawn with the Agg canvas (no pyplot, no global
backend state) at 100 dpi, so a figure of ``w x h`` inches is exactly ``100 w x 100 h`` pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from diffjax.data import images

__all__ = [
    "DPI",
    "GAP",
    "HEADER",
    "MARGIN",
    "PathLike",
    "check_size",
    "curve_figure",
    "save_figure",
    "strip_figure",
    "to_pixels",
]

DPI = 100
MARGIN = 8  # pixels around image strips
GAP = 4  # pixels between cells of a strip
HEADER = 64  # pixels above a strip: a title line and two lines of column labels
PathLike = str | epath.PathLike


def save_figure(fig: Figure, path: PathLike, *, svg: bool = False) -> str:
    """Write ``fig`` as PNG to ``path`` (and as SVG with the same stem); return the PNG path."""
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    formats = {out: "png"}
    if svg:
        formats[out.with_suffix(".svg")] = "svg"
    for target, fmt in formats.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=DPI)
        target.write_bytes(buffer.getvalue())
    return str(out)


def check_size(size_px: Sequence[int]) -> tuple[int, int]:
    """``size_px`` as (width, height), or a ValueError naming it."""
    size = tuple(size_px)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 100 for s in size):
        raise ValueError(f"size_px = {size_px!r}; allowed: (width, height), integers >= 100")
    return size  # type: ignore[return-value]


def curve_figure(width: int, height: int, ncols: int) -> tuple[Figure, list[Any]]:
    """A figure of ``ncols`` plots side by side, with fixed margins in pixels for the labels.

    Fixed margins instead of matplotlib's constrained layout, which measures every label and is
    several times slower to draw.
    """
    left, right, bottom, top, gap = 70, 15, 50, 35, 80  # pixels
    axis_width = (width - left - right - (ncols - 1) * gap) / ncols
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap / axis_width,
    )
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def to_pixels(x: Any, name: str) -> np.ndarray:
    """uint8 images [..., H, W, C]: uint8 stays, floats in [-1, 1] are mapped to 0..255."""
    x = np.asarray(x)
    if x.ndim < 3 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{name} have shape {x.shape}; allowed: [..., H, W, C] with C in (1, 3)")
    return x if x.dtype == np.uint8 else images.to_uint8(x)


def strip_figure(
    cells: np.ndarray,
    *,
    title: str,
    col_labels: Sequence[str],
    row_labels: Sequence[str] | None,
    cell_px: int,
    label_px: int,
    cell_h: int | None = None,
) -> Figure:
    """Images ``cells`` uint8 [R, K, H, W, C] in a grid, one axes per cell at exact pixels.

    Cells are ``cell_px`` wide and ``cell_h`` (default ``cell_px``) high; the figure is
    (label_px + 2*8 + K*cell_px + (K-1)*4) x (64 + R*cell_h + (R-1)*4 + 8) pixels.
    """
    if not isinstance(cell_px, int) or cell_px < 16:
        raise ValueError(f"cell_px = {cell_px!r}; allowed: an integer >= 16")
    cell_h = cell_px if cell_h is None else cell_h
    nrows, ncols = cells.shape[:2]
    width = label_px + 2 * MARGIN + ncols * cell_px + (ncols - 1) * GAP
    height = HEADER + nrows * cell_h + (nrows - 1) * GAP + MARGIN
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.text(MARGIN / width, 1 - 6 / height, title, va="top", ha="left", fontsize=10)
    for r in range(nrows):
        top = HEADER + r * (cell_h + GAP)
        for k in range(ncols):
            left = label_px + MARGIN + k * (cell_px + GAP)
            ax = fig.add_axes(
                (left / width, 1 - (top + cell_h) / height, cell_px / width, cell_h / height)
            )
            # RGB uint8 is drawn as it is: a colormap would requantize the grey levels.
            cell = np.broadcast_to(cells[r, k], (*cells.shape[2:4], 3))
            ax.imshow(cell, interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(col_labels[k], fontsize=8, pad=3)
        if row_labels is not None:
            x, y = (label_px + MARGIN - 4) / width, 1 - (top + cell_h / 2) / height
            fig.text(x, y, row_labels[r], ha="right", va="center", fontsize=10)
    return fig
