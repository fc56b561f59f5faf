"""End to end: ``python train.py`` on the built-in digits data, resume, multi-host start-up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from diffjax import checkpointing, training

REPO = Path(__file__).resolve().parent.parent

# A tiny run: one U-Net level, T = 20, global batch 8 over the 2 fake devices, 2-step DDIM.
TINY_OVERRIDES = {
    "model.ch_mult": "(1,)",
    "model.attn_resolutions": "()",
    "diffusion.num_timesteps": "20",
    "training.batch_size": "8",
    "training.num_train_steps": "4",
    "training.checkpoint_every_steps": "2",
    "training.sample_every_steps": "4",
    "training.log_every_steps": "2",
    "training.keep_checkpoints": "2",
    "optimizer.warmup_steps": "2",
    "sampling.num_samples": "4",
    "sampling.num_steps": "2",
}


def run_cli(workdir: Path, **overrides: str) -> subprocess.CompletedProcess:
    flags = [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **overrides}.items()]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # same compiler settings as this test process
    )
    env.pop("DIFFJAX_DISTRIBUTED", None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def tiny_config(num_train_steps: int):
    """The config the CLI builds from configs/digits.py and TINY_OVERRIDES."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_config", REPO / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in TINY_OVERRIDES.items():
        section, field = key.split(".")
        config[section][field] = eval(value)  # literals only: "(1,)", "20", ...
    config.training.num_train_steps = num_train_steps
    return config


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
    result = training.train_and_evaluate(tiny_config(num_train_steps=4), resumed)
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
