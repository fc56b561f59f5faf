"""A hung step is detected, not waited on forever: a watchdog over repeated calls.

A computation that never returns (a deadlocked kernel, a lost collective) leaves a process
that uses no CPU and prints nothing, and no orchestrator restarts it. ``Watchdog.watch(kind,
what)`` arms a deadline around one call of a repeated kind ("train step", "sampling batch", ...):

    limit = max(factor * median(previous durations of that kind), min_seconds)

When the call outlives it, the watchdog's thread prints which call and what it waited for,
dumps every thread's Python stack (``faulthandler``) and ends the process with
``EXIT_CODE`` (``os._exit``: the main thread may be blocked in native code that no exception
can reach). A run that trains checkpoints as it goes, so the orchestrator restarts it from the
last checkpoint. The first call of each kind compiles, so it is only watched when
``first_seconds`` > 0; ``factor`` = 0 turns the watchdog off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

__all__ = ["EXIT_CODE", "FIELD_RULES", "Watchdog", "WatchdogSettings"]

# The exit status of a process the watchdog ended (as timeout(1) reports a command it stopped).
EXIT_CODE = 124
# Durations kept per kind for the median.
_HISTORY = 50


@dataclasses.dataclass(frozen=True)
class WatchdogSettings:
    """``factor``: a call may take this many times its kind's median (0: no watchdog);
    ``min_seconds``: but never less than this; ``first_seconds``: the limit of a kind's first
    call, which compiles (0: not watched)."""

    factor: float = 20.0
    min_seconds: float = 120.0
    first_seconds: float = 0.0


def _real(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# WatchdogSettings field -> (test of a value, what is allowed): for config validation
# (``training.watchdog_<field>``) and the command lines' ``--watchdog_<field>`` flags.
FIELD_RULES = {
    "factor": (lambda v: _real(v) and (v == 0 or v >= 2), "0 (off) or a number >= 2"),
    "min_seconds": (lambda v: _real(v) and v > 0, "a number > 0"),
    "first_seconds": (lambda v: _real(v) and v >= 0, "0 (not watched) or a number > 0"),
}


def _stall_exit(message: str, stream: TextIO) -> None:
    print(message, file=stream, flush=True)
    faulthandler.dump_traceback(file=stream, all_threads=True)
    stream.flush()
    os._exit(EXIT_CODE)


class Watchdog:
    """Deadlines around repeated calls; see the module docstring.

    :param on_stall: called with the message on the watchdog's thread when a deadline passes;
        the default prints it and the Python stacks to ``stream`` and exits with ``EXIT_CODE``.
    """

    def __init__(
        self,
        settings: WatchdogSettings = WatchdogSettings(),
        *,
        stream: TextIO | None = None,
        on_stall: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._stream = stream or sys.stderr
        self._on_stall = on_stall or (lambda message: _stall_exit(message, self._stream))
        # Per kind: the first call's duration (it compiles) and the later calls' durations.
        self._first: dict[str, float] = {}
        self._durations: dict[str, list[float]] = {}
        self._cond = threading.Condition()
        self._armed: tuple[float, str] | None = None  # (deadline, message)
        self._thread: threading.Thread | None = None
        self._current: tuple[str, float] | None = None  # (kind, start)

    @property
    def enabled(self) -> bool:
        return self.settings.factor > 0

    def limit(self, kind: str) -> float | None:
        """Seconds the next call of ``kind`` may take; None: not watched. The second call's
        median is the first call's duration, compile included."""
        if not self.enabled:
            return None
        past = self._past(kind)
        if not past:
            return self.settings.first_seconds or None
        return max(self.settings.factor * statistics.median(past), self.settings.min_seconds)

    def _past(self, kind: str) -> list[float]:
        return self._durations.get(kind) or ([self._first[kind]] if kind in self._first else [])

    def start(self, kind: str, what: str) -> None:
        """A call of ``kind`` begins (ending any current one without recording it); ``what``
        says what it waits for."""
        limit = self.limit(kind)
        self._current = (kind, time.monotonic())
        if limit is None:
            self._arm(None, "")
            return
        past = self._past(kind)
        median = f"median {statistics.median(past):.3g} s" if past else "its first call"
        message = (
            f"watchdog: {kind} ({what}) has not returned after {limit:.3g} s ({median}; "
            f"limit: max({self.settings.factor:g} x median, {self.settings.min_seconds:g} s)); "
            f"dumping the Python stacks and exiting with status {EXIT_CODE} so that the run "
            "can be restarted from its last checkpoint"
        )
        self._arm(time.monotonic() + limit, message)

    def finish(self) -> None:
        """The current call returned: record its duration and disarm."""
        self._arm(None, "")
        if self._current is None:
            return
        kind, begun = self._current
        self._current = None
        seconds = time.monotonic() - begun
        if kind not in self._first:
            self._first[kind] = seconds
        else:
            history = self._durations.setdefault(kind, [])
            history.append(seconds)
            del history[:-_HISTORY]

    def beat(self, kind: str, what: str) -> None:
        """The current call returned and the next call of ``kind`` begins (for loops that
        report progress through a callback)."""
        self.finish()
        self.start(kind, what)

    def close(self) -> None:
        """Disarm without recording the current call (the watchdog stays usable)."""
        self._arm(None, "")
        self._current = None

    @contextlib.contextmanager
    def watch(self, kind: str, what: str) -> Iterator[None]:
        """Watch the block as one call of ``kind``; ``what`` says what it waits for."""
        self.start(kind, what)
        try:
            yield
        except BaseException:
            self.close()
            raise
        self.finish()

    def _arm(self, deadline: float | None, message: str) -> None:
        with self._cond:
            self._armed = None if deadline is None else (deadline, message)
            if self._thread is None and deadline is not None:
                self._thread = threading.Thread(
                    target=self._run, name="diffjax-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._armed is None:
                    self._cond.wait()
                    continue
                deadline, message = self._armed
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._armed = None
                self._on_stall(message)
