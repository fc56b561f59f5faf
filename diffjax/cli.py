"""Plumbing shared by the command-line tools: bad input is one line on stderr and exit status 2.

Kept free of jax imports so that a tool can reject its flags and a missing run before paying
for jax's start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from etils import epath

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad flag value or an unusable run or file, reported as one line."""


def fail(prog: str, message: str) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` on one line and exit with status 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit status 2."""

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__(prog=f"python -m {name}", **kwargs)
        self.name = name

    def error(self, message: str) -> NoReturn:
        fail(self.name, message)


def run_compute_dtype(workdir: str) -> str:
    """The run's compute dtype (``model.dtype`` of its config.json; float32 if absent)."""
    config = json.loads((epath.Path(workdir) / "config.json").read_text())
    return config.get("model", {}).get("dtype", "float32")


def check_run_dir(workdir: str) -> None:
    """Raise UsageError unless ``workdir`` holds a config.json and at least one checkpoint."""
    path = epath.Path(workdir)
    if not path.exists():
        raise UsageError(f"workdir {workdir} does not exist")
    if not (path / "config.json").exists():
        raise UsageError(f"workdir {workdir} has no config.json: not a diffjax run")
    ckpt = path / "checkpoints"
    if not ckpt.exists() or not any(p.name.isdigit() for p in ckpt.iterdir()):
        raise UsageError(f"workdir {workdir} has no checkpoint in {ckpt}")
