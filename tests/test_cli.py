"""The ``diffjax`` command: its help, its subcommands' help, usage errors; ``import train``.

Cheap: subprocesses that import and print help, nothing trains or compiles.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("train", "sample", "evaluate", "convert", "viz")
# A flag each subcommand's --help must list.
FLAGS = {
    "train": ("--config", "--workdir", "--config.SECTION.FIELD=VALUE"),
    "sample": ("--workdir", "--sampler", "--steps", "--watchdog_factor"),
    "evaluate": ("--workdir", "--metrics", "--inception_weights", "--watchdog_factor"),
    "convert": ("--from", "--to", "--ema_from"),
    "viz": ("--workdir", "--num_vlb_examples"),
}


def _diffjax(*args, timeout=120):
    """``python -m diffjax ARGS`` (the module the ``diffjax`` script runs), in the repo."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "diffjax", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_entry_point_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert '[project.scripts]\ndiffjax = "diffjax.cli.main:main"' in text


def test_help_lists_every_subcommand_with_one_line():
    res = _diffjax("--help")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for name in SUBCOMMANDS:
        (line,) = [x for x in lines if x.split()[:1] == [name]]
        assert len(line.split()) > 2, line  # the name and a summary
    assert res.stderr == ""


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_lists_its_flags(name):
    res = _diffjax(name, "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"usage: diffjax {name} "), res.stdout[:200]
    for flag in FLAGS[name]:
        assert flag in res.stdout, (flag, res.stdout)
    assert "Traceback" not in res.stderr


def test_train_help_explains_overrides():
    res = _diffjax("train", "-h")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--config.training.batch_size=256" in res.stdout
    assert "--noconfig.SECTION.FIELD" in res.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (["bogus"], "diffjax: error: unknown command 'bogus'; choose one of train, sample"),
        ([], "diffjax: error: no command given"),
    ],
)
def test_unknown_or_missing_subcommand_is_one_line_exit_2(args, match):
    res = _diffjax(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(match), res.stderr


def test_subcommand_errors_keep_their_prefix(tmp_path):
    res = _diffjax("sample", f"--workdir={tmp_path / 'nope'}")
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("diffjax.sample: error: ") and "does not exist" in line


def test_train_unknown_override_is_one_error_exit_2(tmp_path):
    res = _diffjax("train", f"--workdir={tmp_path}", "--config.training.bogus=1")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "--config.training.bogus: config.training has no field 'bogus'" in res.stderr
    assert not (tmp_path / "config.json").exists()


def test_train_unexpected_argument_is_one_line_exit_2(tmp_path):
    res = _diffjax("train", f"--workdir={tmp_path}", "extra")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == ["error: unexpected arguments: extra"]


def test_import_train_does_not_exit_on_a_bad_override():
    code = (
        "import sys; sys.argv = ['train.py', '--config.training.bogus=1', '--workdir=/x']; "
        "import train; from absl import flags; "
        "print('imported', callable(train.main), flags.FLAGS['config'].default)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[:2] == ["imported", "True"]
    assert res.stderr == ""
