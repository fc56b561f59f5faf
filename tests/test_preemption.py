"""StopGuard in a single process: signals set the flag, handlers are restored, repeats ignored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from _train_helpers import REPO, cli_args, cli_env, run_cli

from diffjax.training.preemption import StopGuard


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


# --- train.py under signals (subprocesses) ----------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Shared with tests/test_resume.py: the tiny config's step compiles once per session."""
    return tmp_path_factory.getbasetemp() / "jax_cache"


def start_training(workdir, cache_dir, **overrides):
    """train.py on the tiny config for (practically) ever, logging every step."""
    settings = {
        "training.num_train_steps": "100000",
        "training.log_every_steps": "1",
        "training.checkpoint_every_steps": "100000",
        "training.sample_every_steps": "100000",
    }
    settings.update(overrides)
    return subprocess.Popen(
        cli_args(workdir, **settings),
        cwd=REPO,
        env=cli_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the progress bar; stdout has the log lines
        text=True,
    )


def wait_for_line(proc, prefix: str, timeout_s: float = 240.0) -> list[str]:
    """Read stdout until a line starts with ``prefix``; the lines read."""
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"train.py ended before {prefix!r}:\n{''.join(lines)}")
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no {prefix!r} within {timeout_s} s")


def checkpoint_names(workdir) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


@pytest.mark.slow
def test_sigterm_to_train_py_checkpoints_exits_0_and_resumes(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    proc = start_training(workdir, cache_dir)
    try:
        wait_for_line(proc, "step 1:")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        exit_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    (line,) = [x for x in out.splitlines() if x.startswith("stopped by SIGTERM")]
    step = int(line.split("after step ")[1].split(":")[0])
    assert f"checkpoint {workdir / 'checkpoints' / str(step)} is complete" in line
    assert checkpoint_names(workdir) == [str(step)]  # complete, no temporary left
    assert {"params", "ema_params", "opt_state", "meta"} <= {
        p.name for p in (workdir / "checkpoints" / str(step)).iterdir()
    }
    print(f"SIGTERM -> exit 0 in {exit_s:.2f} s (stopped after step {step})")

    result = run_cli(workdir, cache_dir, **{"training.num_train_steps": str(step + 1)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from the checkpoint at step {step}" in result.stdout
    assert str(step + 1) in checkpoint_names(workdir)


@pytest.mark.slow
def test_kill_9_during_checkpointing_resumes_from_the_last_complete_one(tmp_path, cache_dir):
    """SIGKILL while a checkpoint is written every step: nothing half-written is ever used."""
    workdir = tmp_path / "run"
    proc = start_training(workdir, cache_dir, **{"training.checkpoint_every_steps": "1"})
    try:
        wait_for_line(proc, "step 3:")
        proc.kill()  # SIGKILL: no handler, no cleanup, most likely inside an async save
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    complete = [int(n) for n in checkpoint_names(workdir) if n.isdigit()]
    assert complete, checkpoint_names(workdir)
    latest = max(complete)
    result = run_cli(workdir, cache_dir, **{"training.num_train_steps": str(latest + 1)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from the checkpoint at step {latest}" in result.stdout
    # Whatever the kill left half-written was removed; the new step was written completely.
    assert all(n.isdigit() for n in checkpoint_names(workdir)), checkpoint_names(workdir)
    assert str(latest + 1) in checkpoint_names(workdir)


SINGLE_PROCESS_DISTRIBUTED = """
import os, signal, socket, sys, time
import jax
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=1, process_id=0)
from diffjax.training.preemption import StopGuard, jax_preemption_service_active
assert jax_preemption_service_active()
with StopGuard() as guard:
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)  # caught by JAX's notifier, not by Python
    for step in range(1, 2000):
        time.sleep(0.005)
        if guard.should_stop(step):
            print("stopped", step, guard.reason)
            break
"""


@pytest.mark.slow
def test_sigterm_reaches_the_loop_in_a_single_process_distributed_run():
    # jax.distributed with one process: JAX's notifier owns SIGTERM, and should_stop must
    # consult it even though there is no other process to agree with.
    proc = subprocess.run(
        [sys.executable, "-c", SINGLE_PROCESS_DISTRIBUTED],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped" in proc.stdout and "preemption notice (SIGTERM)" in proc.stdout
