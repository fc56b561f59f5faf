"""Training metrics to TensorBoard event files (tensorboardX, no TensorFlow) and to the console.

Only process 0 of a multi-process run writes; the writer of every other process is disabled and
does nothing, so the training loop calls it unconditionally.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

__all__ = ["MetricWriter", "format_metrics"]

# Console order and format of the known metrics; others follow alphabetically.
_CONSOLE_FORMATS: dict[str, str] = {
    "loss": "{:.4f}",
    "mse": "{:.4f}",
    "vlb": "{:.4f}",
    "grad_norm": "{:.3f}",
    "learning_rate": "{:.2e}",
    "images_per_sec": "{:.1f}",
}


def format_metrics(step: int, metrics: Mapping[str, float]) -> str:
    """One console line, e.g. ``step 100: loss 0.1234, grad_norm 0.512, learning_rate 2.00e-04``."""
    names = [k for k in _CONSOLE_FORMATS if k in metrics]
    names += sorted(k for k in metrics if k not in _CONSOLE_FORMATS)
    parts = [f"{k} {_CONSOLE_FORMATS.get(k, '{:.4g}').format(float(metrics[k]))}" for k in names]
    return f"step {step}: " + ", ".join(parts)


class MetricWriter:
    """Scalars and images to ``logdir`` (TensorBoard event files ``logdir/events.out.*``).

    :param enabled: False makes every method a no-op (processes other than 0).

    A gs:// ``logdir`` needs the ``google-cloud-storage`` package (tensorboardX's GCS writer).
    """

    def __init__(self, logdir: str | epath.PathLike, *, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

            self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One point per scalar at ``step``."""
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), global_step=step)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """One uint8 image [H, W, C] (C = 1 or 3) at ``step``."""
        if self._writer is None:
            return
        image = np.asarray(image)
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image must be uint8 [H, W, C]; got dtype {image.dtype} shape {image.shape}"
            )
        self._writer.add_image(name, image, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        """Write pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
