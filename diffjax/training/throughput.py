"""Training throughput: steps/s and images/s over the steps since the last reading.

Only training is timed. The first step of a run compiles the step (minutes on a large model),
so the clock starts when it has finished (:meth:`Throughput.after_step`); the loop restarts it
after each reading and after work that is not training, such as drawing a sample grid.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

__all__ = ["Throughput"]


@dataclasses.dataclass(frozen=True)
class Throughput:
    """``steps`` training steps dispatched since ``start`` (``time.perf_counter()`` seconds)."""

    start: float
    steps: int = 0

    @classmethod
    def started(cls) -> Throughput:
        """A clock that starts now, with no steps."""
        return cls(time.perf_counter())

    def after_step(self, step: int, first_step: int, outputs: Any) -> Throughput:
        """The clock after ``step``: restarted once the run's ``first_step`` (which compiles)
        has finished (waits for ``outputs``), else counting one more step."""
        if step == first_step:
            jax.block_until_ready(outputs)
            return Throughput.started()
        return dataclasses.replace(self, steps=self.steps + 1)

    def steps_per_sec(self) -> float | None:
        """Steps per second since ``start``; None when no step was timed."""
        elapsed = time.perf_counter() - self.start
        return self.steps / elapsed if self.steps and elapsed > 0 else None

    def images_per_sec(self, batch_size: int) -> dict[str, float]:
        """``{"images_per_sec": steps * batch_size / seconds}`` (the global batch), or ``{}``
        when no step was timed: the metric the loop logs."""
        elapsed = time.perf_counter() - self.start
        if not self.steps or elapsed <= 0:
            return {}
        return {"images_per_sec": self.steps * batch_size / elapsed}
