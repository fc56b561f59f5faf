"""How the training loop stops early on SIGTERM / SIGINT, and what it says when it ends.

``diffjax.training.preemption.StopGuard`` records the signal and answers, identically on every
process, whether to stop after a given step. This module is the loop's side of it:

* :func:`stop_guard`: the guard, with the loop's all-gather period;
* :func:`stopped_before_first_step`: asks once with the starting step (which also registers
  it with JAX's preemption sync), so that a notice that arrives while the first step compiles
  stops all processes at the same step;
* :func:`finish_stop`: after the stop step's log and checkpoint (no samples: a preemption
  notice leaves seconds, not minutes), waits until the checkpoint is durable and says where
  it is; the run then returns with ``stopped_early``;
* :func:`report_end`: the line naming the last checkpoint of a run that was not stopped.
"""

from __future__ import annotations

from typing import Any

from etils import epath

from diffjax.training.actions import Outputs
from diffjax.training.preemption import StopGuard

__all__ = [
    "STOP_SYNC_EVERY_STEPS",
    "finish_stop",
    "report_end",
    "stop_guard",
    "stopped_before_first_step",
]

# In multi-process runs a signal caught in Python is agreed on with an all-gather this often
# (SIGTERM under jax.distributed goes through JAX's preemption service at every step instead).
STOP_SYNC_EVERY_STEPS = 10


def stop_guard() -> StopGuard:
    """The loop's StopGuard (enter it: from then on SIGTERM / SIGINT are recorded, not fatal)."""
    return StopGuard(sync_every_steps=STOP_SYNC_EVERY_STEPS)


def stopped_before_first_step(guard: StopGuard, start_step: int, out: Outputs) -> bool:
    """Whether a stop was requested before the first step (nothing to save then)."""
    if not guard.should_stop(start_step):
        return False
    out.say(f"stopped by {guard.reason} before the first step: nothing new to save")
    return True


def finish_stop(guard: StopGuard, out: Outputs, step: int, ckpt_dir: epath.Path) -> None:
    """Wait until the stop step's checkpoint is complete and say where it is."""
    out.manager.wait_until_finished()  # durable before we say so
    out.manager.reload()  # what is on storage now, not what was requested
    out.say(
        f"stopped by {guard.reason} after step {step}: checkpoint "
        f"{ckpt_dir / str(out.manager.latest_step())} is complete; run the same "
        "command to resume",
        flush=True,
    )


def report_end(is_main: bool, stopped_early: bool, last_saved: int, ckpt_dir: Any) -> None:
    """Print the last checkpoint of a run that ended normally (process 0; none: no line)."""
    if is_main and last_saved and not stopped_early:
        print(f"checkpoint: {ckpt_dir / str(last_saved)}")
