"""Curves: the noise schedules, the training loss, evaluation during training, the terms of the
variational bound."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.ticker import FormatStrFormatter

from diffjax.core import schedules
from diffjax.viz.canvas import PathLike, check_size, curve_figure, save_figure
from diffjax.viz.events import read_scalars

__all__ = ["evaluation_curves", "schedule_curves", "training_curves", "vlb_terms"]


def _log_snr(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alphabar [T], log SNR = log abar - log(1 - abar) [T]) in float64, without cancellation."""
    with np.errstate(divide="ignore"):
        log_ac = np.cumsum(np.log1p(-betas))
        return np.exp(log_ac), log_ac - np.log(-np.expm1(log_ac))


def schedule_curves(
    path: PathLike,
    num_timesteps: int = 1000,
    *,
    names: Sequence[str] | None = None,
    highlight: str | None = None,
    size_px: Sequence[int] = (1350, 420),
) -> str:
    """beta_t, alphabar_t (Ho et al. 2020 eq. 4) and log SNR(t) = log(abar_t / (1 - abar_t)).

    One curve per named schedule (``schedules.get_betas``), all at the same T.

    :param names: schedules to draw (default: every name of ``schedules.SCHEDULES``).
    :param highlight: a name to draw thicker (e.g. the schedule of a run).
    :param size_px: (width, height) of the PNG in pixels; an SVG is written next to it.
    """
    width, height = check_size(size_px)
    names = list(schedules.SCHEDULES) if names is None else list(names)
    if not names:
        raise ValueError(
            "names is empty; allowed: schedule names " + ", ".join(schedules.SCHEDULES)
        )
    if highlight is not None and highlight not in names:
        raise ValueError(f"highlight = {highlight!r}; allowed: one of {names}")
    curves = {name: schedules.get_betas(name, num_timesteps) for name in names}  # checks T
    fig, axes = curve_figure(width, height, 3)
    t = np.arange(1, num_timesteps + 1)
    for name, betas in curves.items():
        abar, log_snr = _log_snr(betas)
        lw = 2.5 if name == highlight else 1.2
        for ax, y in zip(axes, (betas, abar, log_snr), strict=True):
            ax.plot(t, y, lw=lw, label=name)
    titles = (
        r"$\beta_t$ (log scale)",
        r"$\bar\alpha_t = \prod_{s \leq t} (1 - \beta_s)$",
        r"$\log \mathrm{SNR}(t) = \log \bar\alpha_t / (1 - \bar\alpha_t)$",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"t (of T = {num_timesteps})")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    return save_figure(fig, path, svg=True)


def _smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing slider)."""
    out, acc = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def _is_loss_tag(tag: str) -> bool:
    leaf = tag.rsplit("/", 1)[-1].lower()
    return leaf in ("loss", "mse", "vlb") or leaf.endswith("loss")


def _loss_tags(scalars: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """The loss-like tags, ``...loss`` first, without a curve that repeats one already kept."""

    def same(a: str, b: str) -> bool:
        (sa, va), (sb, vb) = scalars[a], scalars[b]
        return sa.shape == sb.shape and bool((sa == sb).all() and (va == vb).all())

    kept: list[str] = []
    for tag in sorted(scalars, key=lambda t: (not t.endswith("loss"), t)):
        # With loss_type "simple" the loss is the mse: one of the two identical curves is enough.
        if _is_loss_tag(tag) and not any(same(tag, k) for k in kept):
            kept.append(tag)
    return kept


def training_curves(
    workdir: PathLike,
    path: PathLike,
    *,
    smoothing: float | None = None,
    size_px: Sequence[int] = (1000, 400),
) -> str:
    """The training loss (raw and smoothed) and, if logged, bits/dim against the step.

    Loss tags are those whose last part is ``loss``, ``mse`` or ``vlb`` (or ends in ``loss``),
    less any that repeats another one exactly; bits/dim tags contain ``bpd``. Read with
    :func:`read_scalars`.

    :param smoothing: weight in [0, 1) of the exponential moving average drawn over the loss;
        None: max(0, 1 - 20 / N) for N logged points, i.e. none up to 20 points.
    :param size_px: (width, height) of the PNG in pixels; an SVG is written next to it.
    :raises ValueError: no loss tag among the scalars (the message lists the tags found).
    """
    width, height = check_size(size_px)
    if smoothing is not None and not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing = {smoothing!r}; allowed: a number in [0, 1) or None")
    scalars = read_scalars(workdir)
    loss_tags = _loss_tags(scalars)
    bpd_tags = sorted(t for t in scalars if "bpd" in t.lower())
    if not loss_tags:
        raise ValueError(f"no loss scalar in {workdir}; tags found: {sorted(scalars)}")
    fig, axes = curve_figure(width, height, 2 if bpd_tags else 1)
    smoothed = False
    for i, tag in enumerate(loss_tags):
        steps, values = scalars[tag]
        # Logged values are already means over log_every_steps: smooth only long series.
        weight = max(0.0, 1.0 - 20.0 / len(values)) if smoothing is None else smoothing
        if weight > 0:
            axes[0].plot(steps, values, color=f"C{i}", alpha=0.25, lw=0.8)
            values, smoothed = _smooth(values, weight), True
        axes[0].plot(steps, values, color=f"C{i}", lw=1.6, label=tag)
    if all((scalars[t][1] > 0).all() for t in loss_tags):
        axes[0].set_yscale("log")
        # A loss spans about one decade: label the minor ticks too, as plain numbers.
        for axis_formatter in (
            axes[0].yaxis.set_major_formatter,
            axes[0].yaxis.set_minor_formatter,
        ):
            axis_formatter(FormatStrFormatter("%.2g"))
    axes[0].set_ylabel("loss")
    title = "training loss (faint: as logged, solid: smoothed)" if smoothed else "training loss"
    axes[0].set_title(title, fontsize=10)
    for tag in bpd_tags:
        steps, values = scalars[tag]
        axes[1].plot(steps, values, marker="o", ms=3, label=tag)
    if bpd_tags:
        axes[1].set_title("bits/dim (lower is better)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, svg=True)


def vlb_terms(
    per_step_bpd: Any,
    path: PathLike,
    *,
    prior_bpd: float | None = None,
    size_px: Sequence[int] = (1000, 400),
) -> str:
    """The terms of the variational bound (Ho et al. 2020 eq. 5) per timestep, in bits/dim.

    Left: L_{t-1} for paper t = 2..T and the decoder term L_0 at t = 1 (log scale). Right: the
    running sum from t = 1 upward as a share of the total, which shows where the bits go.

    :param per_step_bpd: [T] terms with L_0 at index 0 (``terms_bpd`` of
        ``diffjax.evaluation.bpd.accumulate_bpd``), or that result itself (then ``prior_bpd`` is
        taken from it too).
    :param prior_bpd: L_T, added to the total in the title.
    :param size_px: (width, height) of the PNG in pixels; an SVG is written next to it.
    """
    width, height = check_size(size_px)
    if isinstance(per_step_bpd, Mapping):
        prior_bpd = per_step_bpd.get("prior_bpd", prior_bpd) if prior_bpd is None else prior_bpd
        per_step_bpd = per_step_bpd["terms_bpd"]
    terms = np.asarray(per_step_bpd, dtype=np.float64)
    if terms.ndim != 1 or terms.size == 0:
        raise ValueError(f"per_step_bpd has shape {terms.shape}; allowed: [T >= 1]")
    if not np.isfinite(terms).all():
        i = int(np.argmin(np.isfinite(terms)))
        raise ValueError(f"per_step_bpd[{i}] = {terms[i]}; allowed: finite values")
    t = np.arange(1, terms.size + 1)
    total = terms.sum() + (prior_bpd or 0.0)
    fig, (left, right) = curve_figure(width, height, 2)
    # KL terms are >= 0; rounding can leave -1e-9, which a log axis cannot show.
    left.plot(t[1:], np.maximum(terms[1:], 1e-12), lw=1.2, label=r"$L_{t-1}$, t = 2..T")
    left.plot(t[:1], np.maximum(terms[:1], 1e-12), "o", color="C3", label=r"$L_0$ (decoder)")
    left.set_yscale("log")
    left.set_xlabel("t")
    left.set_ylabel("bits/dim")
    prior = f", of which $L_T$ = {prior_bpd:.2g}" if prior_bpd is not None else ""
    left.set_title(f"terms of the bound: total {total:.3f} bits/dim{prior}", fontsize=10)
    right.plot(t, np.cumsum(terms) / max(total, 1e-12), lw=1.5, color="C2")
    right.set_ylim(0, 1.02)
    right.set_xscale("log")
    right.set_xlabel("t (log scale)")
    right.set_title(r"share of the bound from steps $\leq t$", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    return save_figure(fig, path, svg=True)


# Last parts of the tags of sample metrics (Frechet distances: lower is better), and of the
# score of real training images on the same metric (its floor), drawn dashed.
_FD_TAGS = ("digits_fd", "fid", "digits_fd_real")
_FLOOR_LABELS = {"digits_fd_real": "real training digits"}


def evaluation_curves(
    workdir: PathLike,
    path: PathLike,
    *,
    smoothing: float | None = None,
    size_px: Sequence[int] = (1350, 400),
) -> str:
    """The curves of evaluation during training beside the training loss, against the step.

    Panels (``diffjax.training.evaluation`` writes the ``eval/`` tags): the training loss
    (smoothed as in :func:`training_curves`) with the fixed-noise eval losses (``eval/loss``,
    ``eval/ema_loss``); bits/dim (``eval/bpd``); the sample metric's Frechet distance
    (``eval/digits_fd`` or ``eval/fid``), with what as many real training digits score
    (``eval/digits_fd_real``, dashed: the metric's floor). A panel without data is left out.

    :param size_px: (width, height) of the PNG in pixels; an SVG is written next to it.
    :raises ValueError: no ``eval/`` scalar (the message lists the tags found).
    """
    width, height = check_size(size_px)
    if smoothing is not None and not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing = {smoothing!r}; allowed: a number in [0, 1) or None")
    scalars = read_scalars(workdir)
    evals = sorted(t for t in scalars if t.startswith("eval/"))
    if not evals:
        raise ValueError(f"no eval/ scalar in {workdir}; tags found: {sorted(scalars)}")
    train = [t for t in _loss_tags(scalars) if not t.startswith("eval/")]
    panels = [
        ("loss", train + [t for t in evals if _is_loss_tag(t)]),
        ("bits/dim (lower is better)", [t for t in evals if "bpd" in t]),
        (
            "Frechet distance (lower is better)",
            [t for t in evals if t.rsplit("/", 1)[-1] in _FD_TAGS],
        ),
    ]
    panels = [(title, tags) for title, tags in panels if tags]
    fig, axes = curve_figure(width, height, len(panels))
    for ax, (title, tags) in zip(axes, panels, strict=True):
        for i, tag in enumerate(tags):
            steps, values = scalars[tag]
            if tag in train:  # logged every few steps: a line, smoothed when long
                weight = max(0.0, 1.0 - 20.0 / len(values)) if smoothing is None else smoothing
                if weight > 0:
                    ax.plot(steps, values, color=f"C{i}", alpha=0.25, lw=0.8)
                    values = _smooth(values, weight)
                ax.plot(steps, values, color=f"C{i}", lw=1.4, label=f"{tag} (training)")
            elif tag.rsplit("/", 1)[-1] in _FLOOR_LABELS:
                label = f"{tag} ({_FLOOR_LABELS[tag.rsplit('/', 1)[-1]]})"
                ax.plot(steps, values, color="0.4", ls="--", marker="o", ms=3, lw=1.0, label=label)
            else:
                ax.plot(steps, values, color=f"C{i}", marker="o", ms=3, lw=1.4, label=tag)
        if title == "loss" and all((scalars[t][1] > 0).all() for t in tags):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, svg=True)
