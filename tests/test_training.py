"""End to end: ``python train.py`` on the built-in digits data, resume, multi-host start-up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _train_helpers import run_cli, tiny_config
from PIL import Image

from diffjax.training import checkpointing
from diffjax.training import loop as training

# run_cli and tiny_config: one U-Net level, T = 20, global batch 8 over 2 fake devices.


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli(workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir, result


def read_checkpoint(workdir: Path, step: int) -> dict:
    """All items of checkpoint ``step``, as saved (numpy trees and the meta dict)."""
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(),
        ema_params=ocp.args.StandardRestore(),
        opt_state=ocp.args.StandardRestore(),
        meta=ocp.args.JsonRestore(),
    )
    with checkpointing.create_checkpoint_manager(workdir, read_only=True) as manager:
        restored = manager.restore(step, args=args)
    assert int(restored["meta"]["step"]) == step
    return restored


@pytest.mark.slow
def test_cli_writes_config_checkpoints_events_and_samples(cli_run):
    workdir, result = cli_run
    assert f"workdir: {workdir.resolve()}" in result.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["training"]["batch_size"] == 8  # the flag override reached the run
    assert config["model"]["ch_mult"] == [1]
    # keep_checkpoints = 2 of the saves at steps 2 and 4; each has the CONTRACT items.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert {"params", "ema_params", "opt_state", "meta"} <= {
        p.name for p in (workdir / "checkpoints" / "4").iterdir()
    }
    meta = json.loads(next((workdir / "checkpoints" / "4" / "meta").glob("*")).read_text())
    assert meta["step"] == 4 and meta["data_position"] == 4 and meta["seed"] == 0
    assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    png = workdir / "samples" / "step_0000004.png"
    with Image.open(png) as image:
        # 4 samples of 8x8 in a 2x2 grid; small images are enlarged to >= 32 px.
        assert image.mode == "L" and min(image.size) >= 2 * 32
    assert "step 4: loss" in result.stderr + result.stdout


@pytest.mark.slow
def test_resume_continues_exactly_where_the_run_stopped(cli_run, tmp_path):
    """Steps 3-4 after a restart at step 2 equal steps 3-4 of the uninterrupted CLI run."""
    workdir, _ = cli_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(workdir / "checkpoints" / "2", resumed / "checkpoints" / "2")
    result = training.train_and_evaluate(tiny_config(**{"training.num_train_steps": 4}), resumed)
    assert int(result.state.step) == 4
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2", "4"]
    straight = read_checkpoint(workdir, 4)
    again = read_checkpoint(resumed, 4)
    # Same program, same data (a function of seed and step), same keys (fold_in(seed, step)):
    # on one machine XLA CPU is deterministic, so the parameters are bitwise equal.
    for name in ("params", "ema_params", "opt_state"):
        for a, b in zip(jax.tree.leaves(straight[name]), jax.tree.leaves(again[name]), strict=True):
            np.testing.assert_array_equal(a, b)
    # The in-memory result is the state that was saved.
    for a, b in zip(
        jax.tree.leaves(result.state.params), jax.tree.leaves(again["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_cli_reports_a_bad_config_in_one_line_per_problem(tmp_path):
    result = run_cli(tmp_path / "bad", **{"training.batch_size": "7"})
    assert result.returncode == 2
    assert "training.batch_size = 7" in result.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"DIFFJAX_DISTRIBUTED": "1"}, True),
        ({"DIFFJAX_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, True),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, True),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "4"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ],
)
def test_multiprocess_is_detected_from_the_environment(env, expected):
    assert training.multiprocess_requested(env) is expected


def test_single_process_run_does_not_initialize_distributed():
    assert training.initialize_distributed({}) is False
