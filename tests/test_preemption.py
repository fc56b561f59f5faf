"""StopGuard in a single process: signals set the flag, handlers are restored, repeats ignored."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from diffjax.preemption import StopGuard


def _deliver(sig: signal.Signals) -> None:
    """Send ``sig`` to this process and give the interpreter a moment to run the handler."""
    os.kill(os.getpid(), sig)
    # The C-level handler only sets a flag; Python runs the handler at the next bytecode
    # boundary of the main thread, at the latest when this sleep returns.
    time.sleep(0.01)


def _sentinel(signum, frame):  # a recognisable "previous" handler
    raise AssertionError("the previous handler must not run inside the guard")


@pytest.fixture
def sentinel_handlers():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, _sentinel)
    yield
    for s, h in old.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_flag_and_handler_is_restored(sig, sentinel_handlers):
    with StopGuard() as guard:
        assert not guard.requested and not guard.should_stop(1)
        _deliver(sig)
        assert guard.requested
        assert guard.reason == sig.name
        assert guard.should_stop(2)
        assert guard.should_stop(3)  # sticky
    assert signal.getsignal(signal.SIGTERM) is _sentinel
    assert signal.getsignal(signal.SIGINT) is _sentinel


def test_repeated_signals_are_ignored_while_stopping(sentinel_handlers, capfd):
    with StopGuard() as guard:
        _deliver(signal.SIGINT)
        _deliver(signal.SIGINT)  # e.g. a second Ctrl-C during the final checkpoint write
        _deliver(signal.SIGTERM)
        assert guard.reason == "SIGINT"  # the first request is the one reported
        assert guard.should_stop(1)
    err = capfd.readouterr().err
    assert err.count("SIGINT received: stopping") == 1
    assert "SIGINT received again: ignored" in err and "SIGTERM received again: ignored" in err


def test_no_signal_no_stop(sentinel_handlers):
    with StopGuard() as guard:
        assert not any(guard.should_stop(s) for s in range(1, 50))
        guard.request_stop("nan loss")
        assert guard.should_stop(50) and guard.reason == "nan loss"


def test_handlers_restored_after_an_exception(sentinel_handlers):
    with pytest.raises(KeyError):
        with StopGuard():
            raise KeyError("boom")
    assert signal.getsignal(signal.SIGTERM) is _sentinel


def test_default_sigint_behaviour_returns_after_exit():
    # Outside the guard Ctrl-C is a KeyboardInterrupt again.
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopGuard():
            _deliver(signal.SIGINT)  # swallowed: recorded, no exception
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_bad_arguments_and_threads():
    with pytest.raises(ValueError, match="sync_every_steps"):
        StopGuard(sync_every_steps=0)
    errors = []

    def enter():
        try:
            with StopGuard():
                pass
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0])
