"""examples/walkthrough.py end to end in its tiny mode, in a subprocess (as a user runs it).

It trains a tiny digits model for 200 steps, draws every figure of the run (which exercises
``diffjax.viz.write_run_figures`` on a real run) and compares DDPM with DDIM sampling.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
FIGURES = (
    "forward",
    "reverse",
    "samples",
    "schedules",
    "training",
    "evaluation",  # configs/digits.py evaluates during training
    "vlb_terms",
    "samplers",
    "samples_ddpm",
    "samples_ddim",
)
MARGIN, GAP, HEADER, CELL = 8, 4, 64, 64  # the strip layout documented in diffjax.viz


@pytest.mark.slow
def test_walkthrough_tiny_mode_runs_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, DIFFJAX_WALKTHROUGH_TINY="1", TFDS_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "walkthrough.py"), f"--workdir={workdir}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout

    assert (workdir / "config.json").exists()
    assert (workdir / "checkpoints" / "200").is_dir()
    for name in FIGURES:
        path = workdir / "figures" / f"{name}.png"
        assert str(path) in out, f"{path} not printed"
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, f"{name}.png is one flat colour"

    # Strips of the tiny run (T = 100): the forward strip has x_0 and 9 noise levels for 4
    # images; the reverse strip 10 saved steps (every 11th of 100) and 2 rows per image.
    size = lambda name: Image.open(workdir / "figures" / f"{name}.png").size
    assert size("forward") == (2 * MARGIN + 10 * CELL + 9 * GAP, HEADER + 4 * CELL + 3 * GAP + 8)
    assert size("reverse") == (
        40 + 2 * MARGIN + 10 * CELL + 9 * GAP,
        HEADER + 8 * CELL + 7 * GAP + 8,
    )
    # Both samplers timed, in the summary.
    assert "DDPM, all steps" in out and "DDIM,  10 steps" in out
