"""Non-finite steps: the deferred flags and ``training.nan_policy``.

The training step never applies a non-finite update: the device keeps the old parameters and
returns ``metrics["skipped"]`` = 1.0 instead (``diffjax.training.step``; the flag is pmean'd, so
it is equal on every replica and every process). Reading that flag at once would make the host
wait for each step to finish before it dispatches the next one. The loop therefore records
``(step, flag)`` in :class:`NonFiniteFlags` and reads the flags one step late, while the device
runs the newer step; before anything is logged or written it catches up completely
(:func:`catch_up`), so that no output describes an unchecked step.

What a run of consecutive non-finite steps does (:meth:`NanPolicy.action`):

* ``nan_policy="stop"``: the first one raises :class:`NonFiniteError`, naming the step and the
  last good checkpoint;
* ``nan_policy="skip"``: each is reported and stepped over, until more than
  ``max_consecutive_skips`` came in a row, which raises as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from etils import epath

from diffjax.errors import ReportableError

__all__ = [
    "NanPolicy",
    "NonFiniteError",
    "NonFiniteFlags",
    "catch_up",
    "describe_last_good",
    "skip_message",
]


class NonFiniteError(ReportableError):
    """The loss or gradient became non-finite and ``training.nan_policy`` says stop."""


@dataclasses.dataclass(frozen=True)
class NanPolicy:
    """``training.nan_policy`` ("stop" or "skip") and ``training.max_consecutive_skips``."""

    policy: str
    max_consecutive_skips: int

    @classmethod
    def from_config(cls, tc: ml_collections.ConfigDict) -> NanPolicy:
        """The policy of ``config.training`` (validated by ``diffjax.config.validation``)."""
        return cls(tc.nan_policy, tc.max_consecutive_skips)

    def action(self, consecutive: int) -> str:
        """ "skip" or "stop" after ``consecutive`` (>= 1) non-finite steps in a row."""
        actions = {
            "stop": lambda: "stop",
            "skip": lambda: "skip" if consecutive <= self.max_consecutive_skips else "stop",
        }
        return actions[self.policy]()

    def error_message(self, step: int, consecutive: int, last_good: str) -> str:
        """The :class:`NonFiniteError` message for a stop at ``step``."""
        first = step - consecutive + 1
        what = (
            f"non-finite loss or gradient at step {step} (training.nan_policy='stop')"
            if self.policy == "stop"
            else f"non-finite loss or gradient in {consecutive} consecutive steps "
            f"({first}-{step}), more than "
            f"training.max_consecutive_skips={self.max_consecutive_skips}"
        )
        return (
            f"{what}; {last_good}. A restart resumes from it; lower optimizer.learning_rate, or "
            "set training.nan_policy=skip to step over isolated bad batches"
        )


def skip_message(step: int, consecutive: int, max_consecutive_skips: int) -> str:
    """The console line of a skipped update."""
    return (
        f"step {step}: non-finite loss or gradient, update skipped "
        f"({consecutive} in a row; at most {max_consecutive_skips})"
    )


@dataclasses.dataclass(frozen=True)
class NonFiniteFlags:
    """The flags the host has not read yet and the current run of non-finite steps.

    ``unchecked``: ``(step, skipped)`` oldest first, ``skipped`` the step's
    ``metrics["skipped"]`` on the devices, [num_local_devices] float32 (1.0: non-finite);
    ``consecutive``: non-finite steps in a row up to the last step read.
    """

    unchecked: tuple[tuple[int, jax.Array], ...] = ()
    consecutive: int = 0

    def record(self, step: int, skipped: jax.Array) -> NonFiniteFlags:
        """``self`` with the flag of ``step`` queued (nothing is read from the device)."""
        return dataclasses.replace(self, unchecked=(*self.unchecked, (step, skipped)))


def catch_up(
    flags: NonFiniteFlags,
    policy: NanPolicy,
    *,
    keep: int,
    report: Callable[[str], None],
    last_good: Callable[[], str],
) -> NonFiniteFlags:
    """Read all but the newest ``keep`` queued flags, oldest first; the flags left.

    Each non-finite step is either reported (``report(skip_message(...))``) or, when the
    policy says stop, raises :class:`NonFiniteError` whose message ends with ``last_good()``.
    Reading a flag waits for its step to finish on the device.

    :raises NonFiniteError: see above.
    """
    unchecked, consecutive = list(flags.unchecked), flags.consecutive
    while len(unchecked) > keep:
        step, skipped = unchecked.pop(0)
        consecutive = consecutive + 1 if float(skipped[0]) > 0 else 0
        if not consecutive:
            continue
        if policy.action(consecutive) == "stop":
            raise NonFiniteError(policy.error_message(step, consecutive, last_good()))
        report(skip_message(step, consecutive, policy.max_consecutive_skips))
    return NonFiniteFlags(tuple(unchecked), consecutive)


def describe_last_good(manager: Any, ckpt_dir: epath.Path) -> str:
    """ "the last good checkpoint is <path>" once pending saves are complete (or that there is
    none): what a :class:`NonFiniteError` tells the user to resume from."""
    manager.wait_until_finished()
    good = manager.latest_step()
    if good is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint is {ckpt_dir / str(good)}"
