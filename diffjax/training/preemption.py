"""Graceful stop on SIGTERM / SIGINT, agreed across processes.

A preemptible Cloud TPU VM (or a Kubernetes pod) gets SIGTERM some seconds before it is killed;
an operator presses Ctrl-C (SIGINT). Either way the training loop should finish its current
step, write a checkpoint, wait until it is durable and exit 0. This module only *records* the
request and answers ``should_stop(step)``; the loop does the saving.

Usage::

    with StopGuard(sync_every_steps=10) as guard:
        if guard.should_stop(start):  # registers the starting step
            return
        for step in range(start, num_steps):
            state = train_step(state, batch)
            if guard.should_stop(step + 1):
                save(step + 1); manager.wait_until_finished()
                print(f"stopped by {guard.reason} at step {step + 1}; checkpoint at ...")
                break

Multi-process agreement. Every process must stop after the same step, or the ones still
training hang in a collective that the stopped ones never join. Two mechanisms, OR-ed:

* JAX's preemption sync service (``jax.distributed`` with ``jax_enable_preemption_service``,
  the default). Its notifier catches SIGTERM in C++ on any host, propagates the notice through
  the coordination service, and ``multihost_utils.reached_preemption_sync_point(step)`` (what
  ``orbax.checkpoint.CheckpointManager.reached_preemption`` calls) returns True on every
  process at the same step (the maximum step any process had reached, plus one). It costs
  nothing per step, but needs ``should_stop`` to be called at every step with consecutive
  step numbers. When this service is active the guard leaves SIGTERM to it: a Python handler
  would replace the C++ one, and restoring "the previous handler" (Python only knows SIG_DFL)
  would remove it for good.
* A local flag set by the Python handlers (SIGINT always; SIGTERM when the service is not
  active), OR-reduced over processes with a tiny all-gather every ``sync_every_steps`` steps.
  All processes evaluate it at the same step numbers, so they agree. The all-gather waits for
  the devices, which is why it does not run every step.

In a single process (no ``jax.distributed``) ``should_stop`` just reads the local flag.

Repeated signals. After the first signal the handlers stay installed until the guard exits,
and every further SIGTERM / SIGINT is reported and ignored: a second Ctrl-C while the stop
checkpoint is written must not interrupt the write. To abort anyway, use SIGKILL (``kill -9``):
orbax writes each checkpoint into a temporary directory and renames it only when complete, so
an interrupted write is discarded and the next start resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import numpy as np

__all__ = ["DEFAULT_SIGNALS", "StopGuard", "jax_preemption_service_active"]

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


def _write_stderr(text: str) -> None:
    # os.write, not print: a signal handler may run while the main thread is inside a print to
    # sys.stderr, and re-entering a buffered stream raises RuntimeError.
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def _process_count() -> int:
    import jax

    return jax.process_count()


def jax_preemption_service_active() -> bool:
    """Whether jax.distributed runs with the preemption sync service (which owns SIGTERM)."""
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - layout of jax changed
        return False
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class StopGuard:
    """Context manager: record SIGTERM / SIGINT and decide, consistently, when to stop.

    :param sync_every_steps: in multi-process runs, how often (in steps) the local flags of all
        processes are OR-reduced with an all-gather. The stop happens at most this many steps
        after a signal handled in Python. Ignored in a single process.
    :param signals: the signals to handle (default SIGTERM and SIGINT).
    """

    def __init__(
        self,
        *,
        sync_every_steps: int = 10,
        signals: Sequence[signal.Signals] = DEFAULT_SIGNALS,
    ):
        if isinstance(sync_every_steps, bool) or not isinstance(sync_every_steps, int):
            raise ValueError(f"sync_every_steps must be an int >= 1, got {sync_every_steps!r}")
        if sync_every_steps < 1:
            raise ValueError(f"sync_every_steps must be >= 1, got {sync_every_steps}")
        self.sync_every_steps = sync_every_steps
        self.signals = tuple(signal.Signals(s) for s in signals)
        self._event = threading.Event()
        self._reason: str | None = None
        self._decided: bool = False
        self._previous: dict[signal.Signals, Any] = {}
        self._num_processes = 1
        self._native = False

    # -- context protocol ---------------------------------------------------------------------

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopGuard must be entered in the main thread (signal handlers)")
        self._num_processes = _process_count()
        self._native = jax_preemption_service_active()
        for sig in self.signals:
            if sig == signal.SIGTERM and self._native:
                continue  # owned by JAX's preemption notifier, see the module docstring
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python and cannot be restored.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._event.is_set():
            _write_stderr(
                f"{name} received again: ignored, the stop is in progress (the checkpoint is "
                "written and made durable before exit). SIGKILL is safe: the run then resumes "
                "from the last complete checkpoint.\n"
            )
            return
        self.request_stop(name)
        _write_stderr(f"{name} received: stopping after the current step and checkpointing.\n")

    # -- public API ---------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Record a local stop request (what the signal handlers call)."""
        if not self._event.is_set():
            self._reason = reason
            self._event.set()

    @property
    def requested(self) -> bool:
        """Whether this process received a stop request (not yet agreed across processes)."""
        return self._event.is_set()

    @property
    def reason(self) -> str | None:
        """What asked for the stop: a signal name, 'preemption notice', 'another process'."""
        return self._reason

    def should_stop(self, step: int) -> bool:
        """True when every process should stop after ``step``; the same answer on all of them.

        Call it once per step, on every process, with consecutive step numbers (JAX's sync
        service requires it), after the step's update; and once before the first update with
        the starting step, so that a resumed run and a notice received before the first step
        agree on the sync step. Once True it stays True.
        """
        if self._decided:
            return True
        if self._native and _reached_native_sync_point(step):
            self._decided = True
            if self._reason is None:
                self._reason = "preemption notice (SIGTERM)"
        if self._num_processes == 1:
            # No one to agree with; a single-process jax.distributed run still has the service.
            self._decided = self._decided or self._event.is_set()
        elif step % self.sync_every_steps == 0:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self._event.is_set()))
            if np.any(flags):
                self._decided = True
                if self._reason is None:
                    self._reason = "a stop request on another process"
        return self._decided


def _reached_native_sync_point(step: int) -> bool:
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # service disabled after all: treat as no notice
        return False
