"""Image strips: the forward process, a reverse trajectory, sample grids side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core import diffusion, schedules
from diffjax.data.images import make_grid, to_uint8
from diffjax.viz.canvas import PathLike, save_figure, strip_figure, to_pixels

__all__ = ["check_timesteps", "forward_process_strip", "reverse_process_strip", "sample_comparison"]


def check_timesteps(ts: Any, num_timesteps: int | None, name: str = "ts") -> np.ndarray:
    """``ts`` as int32 [K] if it is a non-empty list of timesteps in [0, T), else a ValueError.

    ``num_timesteps`` None checks only that the steps are >= 0.
    """
    arr = np.asarray(ts)
    allowed = "a non-empty 1-D sequence of 0-indexed timesteps (0 is the paper's t = 1)"
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} = {ts!r}; allowed: {allowed}")
    hi = num_timesteps if num_timesteps is not None else np.iinfo(np.int32).max
    bad = (arr < 0) | (arr >= hi)
    if bad.any():
        where = f"[0, {num_timesteps})" if num_timesteps is not None else ">= 0"
        raise ValueError(f"{name} has timestep {int(arr[bad][0])} out of range; allowed: {where}")
    return arr.astype(np.int32)


def forward_process_strip(
    images: Any,
    schedule: schedules.Schedule,
    ts: Sequence[int],
    path: PathLike,
    rng: jax.Array | int,
    *,
    cell_px: int = 64,
) -> str:
    """x_0 and draws of x_t ~ q(x_t | x_0) (Ho et al. 2020 eq. 4) for a few images, one per row.

    Each image gets one noise draw eps, shared by its columns, so a row shows one path of
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps as t grows (``diffusion.q_sample``).

    :param images: [N, H, W, C] uint8 or float in [-1, 1], C in (1, 3).
    :param ts: 0-indexed timesteps in [0, T) (columns after x_0).
    :param rng: a PRNG key (or an int seed) for the noise.
    :param cell_px: pixels per image; the PNG is (2*8 + K*cell_px + (K-1)*4) wide and
        (64 + N*cell_px + (N-1)*4 + 8) high, K = len(ts) + 1.
    """
    x = to_pixels(images, "images")
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images have shape {x.shape}; allowed: [N >= 1, H, W, C]")
    t = check_timesteps(ts, schedule.num_timesteps)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    x0 = jnp.asarray(x, jnp.float32) / 127.5 - 1.0  # [N, H, W, C] in [-1, 1]
    n, k = x0.shape[0], t.shape[0]
    noise = jax.random.normal(key, x0.shape, jnp.float32)
    x0_rep, noise_rep = jnp.tile(x0, (k, 1, 1, 1)), jnp.tile(noise, (k, 1, 1, 1))  # [K N, ...]
    xt = diffusion.q_sample(schedule, x0_rep, jnp.asarray(np.repeat(t, n)), noise_rep)
    xt = to_uint8(xt).reshape(k, n, *x.shape[1:]).transpose(1, 0, 2, 3, 4)  # [N, K, ...]
    cells = np.concatenate([x[:, None], xt], axis=1)  # [N, K + 1, H, W, C]
    signal = np.asarray(schedule.sqrt_alphas_cumprod)[t]
    labels = ["$x_0$ (data)"] + [
        f"t={s + 1}\n" + r"$\sqrt{\bar\alpha_t}$" + f"={a:.2f}"
        for s, a in zip(t, signal, strict=True)
    ]
    title = r"Forward process $q(x_t \mid x_0)$" + f", T = {schedule.num_timesteps}"
    fig = strip_figure(
        cells, title=title, col_labels=labels, row_labels=None, cell_px=cell_px, label_px=0
    )
    return save_figure(fig, path)


def _even_subset(size: int, count: int) -> np.ndarray:
    """``count`` evenly spaced indices of range(size), first and last included."""
    return np.unique(np.round(np.linspace(0, size - 1, min(count, size))).astype(int))


def reverse_process_strip(
    trajectory_xt: Any,
    trajectory_x0: Any,
    ts: Sequence[int],
    path: PathLike,
    *,
    max_images: int = 4,
    max_columns: int = 10,
    cell_px: int = 64,
) -> str:
    """x_t and the network's estimate of x_0 along sampling trajectories, two rows per sample.

    The inputs are the fields of :class:`diffjax.core.sampling.Trajectory` (``sample(...,
    return_trajectory=True)``), in sampling order. At most ``max_columns`` evenly spaced steps
    (first and last included) and the first ``max_images`` samples are shown.

    :param trajectory_xt: [S, B, H, W, C] states fed to the model, float in [-1, 1] (clipped).
    :param trajectory_x0: [S, B, H, W, C] estimates of x_0 made from them.
    :param ts: [S] 0-indexed timesteps of the saved steps (``Trajectory.t``).
    :param cell_px: pixels per image; the PNG is (40 + 2*8 + K*cell_px + (K-1)*4) wide and
        (64 + R*cell_px + (R-1)*4 + 8) high, K = min(S, max_columns) columns,
        R = 2 min(B, max_images) rows.
    """
    xt = to_pixels(trajectory_xt, "trajectory_xt")
    x0 = to_pixels(trajectory_x0, "trajectory_x0")
    if xt.ndim != 5 or xt.shape != x0.shape or 0 in xt.shape[:2]:
        raise ValueError(
            f"trajectory_xt {xt.shape} and trajectory_x0 {x0.shape}; allowed: equal shapes "
            "[S >= 1, B >= 1, H, W, C]"
        )
    t = check_timesteps(ts, None)
    if t.shape[0] != xt.shape[0]:
        raise ValueError(
            f"ts has {t.shape[0]} entries; allowed: one per saved step ({xt.shape[0]})"
        )
    for name, value in (("max_images", max_images), ("max_columns", max_columns)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}; allowed: an integer >= 1")
    cols = _even_subset(xt.shape[0], max_columns)
    b = min(xt.shape[1], max_images)
    pairs = np.stack([xt[cols, :b], x0[cols, :b]], axis=1)  # [K, 2, b, H, W, C]
    cells = pairs.transpose(2, 1, 0, 3, 4, 5).reshape(2 * b, cols.size, *xt.shape[2:])
    labels = [f"t={s + 1}" for s in t[cols]]
    rows = [r"$x_t$", r"$\hat{x}_0$"] * b
    title = r"Reverse process: $x_t$ and the network's estimate $\hat{x}_0$"
    fig = strip_figure(
        cells, title=title, col_labels=labels, row_labels=rows, cell_px=cell_px, label_px=40
    )
    return save_figure(fig, path)


def sample_comparison(
    samples: Mapping[str, Any],
    path: PathLike,
    *,
    title: str = "",
    panel_px: int = 320,
    ncols: int | None = None,
) -> str:
    """Sample grids side by side, one panel per entry, titled by its key (e.g. "DDPM, 12 s").

    :param title: a line above the panels.
    :param samples: title -> images [N, H, W, C] (uint8 or float in [-1, 1]), equal shapes.
    :param ncols: images per grid row (default: a square-ish grid,
        ``diffjax.data.images.make_grid``).
    :param panel_px: width of each panel; its height keeps the grid's aspect ratio. The PNG is
        (2*8 + P*panel_px + (P-1)*4) wide and (64 + round(panel_px * h / w) + 8) high, P =
        len(samples) and h x w the size of one grid (1 pixel of white between images).
    """
    if not samples:
        raise ValueError("samples is empty; allowed: a mapping of title -> images [N, H, W, C]")
    arrays = {name: to_pixels(x, f"samples[{name!r}]") for name, x in samples.items()}
    shapes = {x.shape for x in arrays.values()}
    if len(shapes) != 1 or any(len(s) != 4 or s[0] == 0 for s in shapes):
        raise ValueError(f"samples have shapes {sorted(shapes)}; allowed: equal [N >= 1, H, W, C]")
    grid = np.stack([make_grid(x, ncols, padding=1, pad_value=255) for x in arrays.values()])
    cell_h = round(panel_px * grid.shape[1] / grid.shape[2])
    fig = strip_figure(
        grid[None],
        title=title,
        col_labels=list(arrays),
        row_labels=None,
        cell_px=panel_px,
        label_px=0,
        cell_h=cell_h,
    )
    return save_figure(fig, path)
