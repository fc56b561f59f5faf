"""Periodic actions of a training loop: every N steps and at the last step.

A small equivalent of ``clu.periodic_actions`` (github.com/google/CommonLoopUtils): an action
runs at every multiple of ``every_steps`` and at the last step of the run, which is also the
step after which a preemption stops it (``on_stop=False`` leaves out work too slow for the
seconds a preemption notice leaves, such as sampling). Unlike clu's actions, deciding which
actions are due (:func:`due_actions`) is separate from running them, because the loop has to
catch up on the non-finite flags of its steps (``diffjax.training.nonfinite``) before any
output is written. An action is a function of the loop's state that returns the new state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["PeriodicAction", "due_actions"]

S = TypeVar("S")


@dataclasses.dataclass(frozen=True)
class PeriodicAction(Generic[S]):
    """``run(state) -> state`` every ``every_steps`` steps and at the last step.

    ``name``: what it does (for messages and tests); ``on_stop``: whether it also runs at the
    step after which a stop request ends the run; ``enabled``: False never runs it (e.g. the
    outputs that only process 0 writes).
    """

    name: str
    every_steps: int
    run: Callable[[S], S]
    on_stop: bool = True
    enabled: bool = True

    def due(self, step: int, *, last: bool, stopping: bool) -> bool:
        """Whether to run after ``step``; ``last``: no step follows (the end of the run or a
        stop); ``stopping``: a stop request ends the run after this step."""
        if not self.enabled or (stopping and not self.on_stop):
            return False
        return step % self.every_steps == 0 or last


def due_actions(
    actions: Sequence[PeriodicAction[S]], step: int, *, last: bool, stopping: bool
) -> list[PeriodicAction[S]]:
    """The actions to run after ``step``, in their order (see :meth:`PeriodicAction.due`)."""
    return [a for a in actions if a.due(step, last=last, stopping=stopping)]
