"""A hung step is detected, not waited on forever: injected stalls in training and sampling.

Each test runs the real entry point in a subprocess whose step (or sampling call) blocks for a
minute at one call, with a watchdog limit of max(2 x median, 1 s): the process must end with
status 124 within seconds, naming the call and showing where the main thread waited, and a
stopped training run must resume from its last checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from _train_helpers import REPO, cli_env, run_cli

from diffjax.training.watchdog import EXIT_CODE

STALL_TRAINING = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from _train_helpers import tiny_config
    from diffjax.training import loop as training

    real = training.make_p_train_step

    def make_stalling_step(*args, **kwargs):
        step = real(*args, **kwargs)
        calls = []

        def stalled_device_step(state, batch):  # the 6th update never returns
            calls.append(1)
            if len(calls) == 6:
                time.sleep(120)
            return step(state, batch)

        return stalled_device_step

    training.make_p_train_step = make_stalling_step
    config = tiny_config(**{{
        "training.num_train_steps": 8,
        "training.watchdog_factor": 2.0,
        "training.watchdog_min_seconds": 1.0,
    }})
    training.train_and_evaluate(config, {workdir!r})
    """
)


def _run_with_stall(template: str, workdir) -> subprocess.CompletedProcess:
    code = template.format(tests=str(REPO / "tests"), workdir=str(workdir))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.slow  # two train.py-sized runs
def test_stalled_train_step_exits_124_and_the_run_resumes(tmp_path):
    workdir = tmp_path / "run"
    out = _run_with_stall(STALL_TRAINING, workdir)
    assert out.returncode == EXIT_CODE, out.stdout[-2000:] + out.stderr[-4000:]
    assert "watchdog: train step (step 6, waiting for the device) has not returned" in out.stderr
    assert "in stalled_device_step" in out.stderr  # faulthandler's stack of the main thread
    # The checkpoints of steps 2 and 4 were written before the stall: the same run resumes.
    again = run_cli(workdir, **{"training.num_train_steps": "8"})
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from the checkpoint at step 4" in again.stdout


STALL_SAMPLING = textwrap.dedent(
    """
    import sys, time
    import jax
    sys.path.insert(0, {tests!r})
    from _train_helpers import tiny_config
    from diffjax import run
    from diffjax.training import checkpointing
    from diffjax.cli import sample
    from diffjax.models import create_model, init_params

    config = tiny_config()
    params = init_params(create_model(config), jax.random.key(0), 8, 1)
    checkpointing.save_inference_run({workdir!r}, config, params, params, 3)

    real = run.Run.sample
    calls = []

    def stalled_sampling_call(self, *args, **kwargs):  # the 4th batch never returns
        calls.append(1)
        if len(calls) == 4:
            time.sleep(120)
        return real(self, *args, **kwargs)

    run.Run.sample = stalled_sampling_call
    sample.main([
        "--workdir={workdir}", "--num=12", "--batch_size=2", "--sampler=ddim", "--steps=2",
        "--watchdog_factor=2", "--watchdog_min_seconds=1",
    ])
    """
)


@pytest.mark.slow  # compiles a sampler
def test_stalled_sampling_batch_exits_124(tmp_path):
    out = _run_with_stall(STALL_SAMPLING, tmp_path / "run")
    assert out.returncode == EXIT_CODE, out.stdout[-2000:] + out.stderr[-4000:]
    assert "watchdog: sampling batch (batch 4 of 6, 2 samples) has not returned" in out.stderr
    assert "in stalled_sampling_call" in out.stderr


def test_watchdog_flags_are_checked_in_one_line(tmp_path, capsys):
    from diffjax.cli import sample

    with pytest.raises(SystemExit) as exc:
        sample.main([f"--workdir={tmp_path}", "--watchdog_factor=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "diffjax.sample: error: --watchdog_factor=1.0: allowed: 0 (off) or a number >= 2"
    )
