"""The watchdog: a call far slower than its kind's median ends the process with the stacks."""

import subprocess
import sys
import textwrap
import time

import pytest

from diffjax.training.watchdog import EXIT_CODE, FIELD_RULES, Watchdog, WatchdogSettings


def _dog(factor=3.0, min_seconds=0.05, first_seconds=0.0):
    stalls = []
    dog = Watchdog(WatchdogSettings(factor, min_seconds, first_seconds), on_stall=stalls.append)
    return dog, stalls


def _calls(dog, kind, seconds, n):
    for i in range(n):
        with dog.watch(kind, f"call {i}"):
            time.sleep(seconds)


def test_limit_is_factor_times_the_median_with_a_floor():
    dog, stalls = _dog(factor=3.0, min_seconds=0.05)
    assert dog.limit("step") is None  # the first call compiles: not watched
    _calls(dog, "step", 0.02, 1)
    # The second call's median is the first call's duration (compile included).
    assert dog.limit("step") == pytest.approx(max(3 * 0.02, 0.05), rel=0.5)
    _calls(dog, "step", 0.04, 5)
    # Later calls: the first one's duration is dropped, the median is of the rest.
    assert dog.limit("step") == pytest.approx(3 * 0.04, rel=0.25)
    assert dog.limit("other kind") is None  # each kind has its own history
    assert stalls == []


def test_a_stalled_call_is_reported_with_its_kind_and_what_it_waited_for():
    dog, stalls = _dog(factor=3.0, min_seconds=0.05)
    _calls(dog, "train step", 0.01, 4)
    with dog.watch("train step", "step 5, waiting for the device"):
        time.sleep(0.6)  # > max(3 x 0.01, 0.05)
    assert len(stalls) == 1
    assert "train step (step 5, waiting for the device) has not returned after" in stalls[0]
    assert f"exiting with status {EXIT_CODE}" in stalls[0]
    # A call within its limit after that: no new report.
    _calls(dog, "train step", 0.01, 2)
    assert len(stalls) == 1


def test_first_call_watched_only_when_asked():
    dog, stalls = _dog(first_seconds=0.1)
    with dog.watch("compile", "first call"):
        time.sleep(0.4)
    assert len(stalls) == 1 and "its first call" in stalls[0]


def test_factor_zero_turns_it_off():
    dog, stalls = _dog(factor=0.0, min_seconds=0.01, first_seconds=0.01)
    _calls(dog, "step", 0.001, 3)
    with dog.watch("step", "slow"):
        time.sleep(0.2)
    assert stalls == [] and dog.limit("step") is None


def test_beat_measures_between_progress_callbacks_and_close_disarms():
    dog, stalls = _dog(factor=3.0, min_seconds=0.05)
    dog.start("batch", "batch 1")
    for i in range(4):
        time.sleep(0.01)
        dog.beat("batch", f"batch {i + 2}")
    time.sleep(0.5)  # batch 6 never comes
    assert len(stalls) == 1 and "batch (batch 5)" in stalls[0]
    dog.start("batch", "batch 6")
    dog.close()  # e.g. the loop raised: the error is reported, not timed out
    time.sleep(0.3)
    assert len(stalls) == 1


def test_an_exception_in_the_block_disarms():
    dog, stalls = _dog(factor=3.0, min_seconds=0.05)
    _calls(dog, "step", 0.005, 3)
    with pytest.raises(RuntimeError), dog.watch("step", "raises"):
        raise RuntimeError("boom")
    time.sleep(0.3)
    assert stalls == []


@pytest.mark.parametrize(
    "name, good, bad",
    [
        ("factor", [0, 2, 20.0], [1.5, -1, float("nan"), float("inf"), True, "20"]),
        ("min_seconds", [0.5, 120], [0, -1, float("inf")]),
        ("first_seconds", [0, 600.0], [-1, float("nan")]),
    ],
)
def test_field_rules(name, good, bad):
    ok, _ = FIELD_RULES[name]
    assert all(ok(v) for v in good) and not any(ok(v) for v in bad)


def test_default_action_dumps_the_stacks_and_exits_124():
    # In a subprocess: the default on_stall ends the process (os._exit), even while the main
    # thread is blocked where no Python exception could reach it.
    code = textwrap.dedent(
        """
        import time
        from diffjax.training.watchdog import Watchdog, WatchdogSettings

        def blocked_in_the_device_wait():
            time.sleep(60)

        dog = Watchdog(WatchdogSettings(factor=2, min_seconds=0.5))
        for i in range(3):
            with dog.watch("train step", f"step {i}"):
                time.sleep(0.01)
        with dog.watch("train step", "step 3, waiting for the device"):
            blocked_in_the_device_wait()
        print("not reached")
        """
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == EXIT_CODE, out.stderr
    assert time.monotonic() - t0 < 30
    assert "not reached" not in out.stdout
    assert "watchdog: train step (step 3, waiting for the device)" in out.stderr
    assert "in blocked_in_the_device_wait" in out.stderr  # the main thread's Python stack
