"""What the training loop knows between two steps: :class:`Progress`, one frozen value.

After each step the loop replaces it with ``progress.after_step(...)`` (the step count, the
metrics to average at the next log, the queued non-finite flags, the throughput clock), and
each periodic action (``diffjax.training.actions``) returns an updated copy, so no state of
the loop lives in mutable locals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from diffjax.training.nonfinite import NonFiniteFlags
from diffjax.training.state import TrainState
from diffjax.training.throughput import Throughput

__all__ = ["Progress", "console_metrics", "mean_metrics"]

# One step's metrics as the pmapped step returns them: name -> [num_local_devices] array.
StepMetrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Progress:
    """The loop's state after ``step`` completed updates.

    ``p_state``: the TrainState replicated over the local devices (every leaf [num_local, ...]),
    donated to the next step; ``history``: the metrics of the steps since the last log;
    ``flags``: the non-finite flags not read yet; ``timer``: the throughput clock;
    ``metrics``: the last logged metrics; ``last_saved``: the step of the last checkpoint
    written (or resumed from).
    """

    step: int
    p_state: TrainState
    timer: Throughput
    history: tuple[StepMetrics, ...] = ()
    flags: NonFiniteFlags = NonFiniteFlags()
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    last_saved: int = 0

    @classmethod
    def start(cls, step: int, p_state: TrainState) -> Progress:
        """Before the first step of a run that starts (or resumes) at ``step``."""
        return cls(step=step, p_state=p_state, timer=Throughput.started(), last_saved=step)

    def after_step(self, p_state: TrainState, metrics: StepMetrics, first_step: int) -> Progress:
        """The state after one more step that returned ``p_state`` and ``metrics``; the run's
        ``first_step`` compiles and is waited for (see :class:`Throughput`)."""
        step = self.step + 1
        return dataclasses.replace(
            self,
            step=step,
            p_state=p_state,
            history=(*self.history, metrics),
            flags=self.flags.record(step, metrics["skipped"]),
            timer=self.timer.after_step(step, first_step, metrics),
        )

    def replace(self, **changes: Any) -> Progress:
        """A copy with ``changes`` (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)


def mean_metrics(history: tuple[StepMetrics, ...]) -> dict[str, float]:
    """Average of the per-step metrics (already pmean'd: replica 0 holds the global value)."""
    host = jax.device_get([{k: v[0] for k, v in m.items()} for m in history])
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def console_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics of a console line: "skipped" (fraction of skipped updates) only when there
    were any."""
    return {k: v for k, v in metrics.items() if k != "skipped" or v > 0}
