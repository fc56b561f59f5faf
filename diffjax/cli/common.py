"""Plumbing shared by the command-line tools: bad input is one line on stderr and exit status 2.

Errors go through the one handler of :mod:`diffjax.errors`: a command wraps its work in
``errors.exit_on_reportable_error(prog=...)``, and :class:`UsageError` (a ``ReportableError``,
exit status 2) is what it raises for a bad flag or an unusable run or file.

Kept free of jax imports so that a tool can reject its flags and a missing run before paying
for jax's start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, NoReturn

from etils import epath

from diffjax import errors
from diffjax.errors import UsageError

if TYPE_CHECKING:
    from diffjax.training.watchdog import WatchdogSettings

__all__ = [
    "EXIT_USAGE",
    "OneLineParser",
    "UsageError",
    "add_watchdog_flags",
    "check_run_dir",
    "configure_runtime_for",
    "fail",
    "print_kernels",
    "run_compute_dtype",
    "run_kernels",
    "watchdog_settings",
]

EXIT_USAGE = UsageError.exit_code  # 2


def fail(prog: str, message: str) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` on one line and exit with status 2 (the one handler)."""
    errors.report_and_exit(UsageError(message), prog=prog)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit status 2.

    ``name`` is the prefix of its error lines (``diffjax.sample: error: ...``); ``prog`` the
    command shown by ``--help`` (default ``python -m NAME``).
    """

    def __init__(self, name: str, prog: str | None = None, **kwargs) -> None:
        super().__init__(prog=prog or f"python -m {name}", **kwargs)
        self.name = name

    def error(self, message: str) -> NoReturn:
        fail(self.name, message)


def add_watchdog_flags(parser: argparse.ArgumentParser) -> None:
    """``--watchdog_factor``, ``--watchdog_min_seconds``, ``--watchdog_first_seconds``
    (``diffjax.training.watchdog``), defaults as training's."""
    from diffjax.training.watchdog import WatchdogSettings

    helps = {
        "factor": "a call may take this many times its median (0: no watchdog)",
        "min_seconds": "but never less than this many seconds",
        "first_seconds": "limit of the first call, which compiles (0: not watched)",
    }
    for name, text in helps.items():
        default = getattr(WatchdogSettings, name)
        parser.add_argument(f"--watchdog_{name}", type=float, default=default, help=text)


def watchdog_settings(args: argparse.Namespace) -> WatchdogSettings:
    """The ``WatchdogSettings`` of the flags; raises UsageError naming a bad value."""
    from diffjax.training.watchdog import FIELD_RULES, WatchdogSettings

    values = {name: getattr(args, f"watchdog_{name}") for name in FIELD_RULES}
    for name, (ok, allowed) in FIELD_RULES.items():
        if not ok(values[name]):
            raise UsageError(f"--watchdog_{name}={values[name]}: allowed: {allowed}")
    return WatchdogSettings(**values)


def print_kernels(compute_dtype: str, kernels: str = "tuned") -> None:
    """On a CPU backend, say once on stderr which convolutions and products the run uses."""
    import jax

    from diffjax import kernels as kernel_switch

    if jax.default_backend() == "cpu":
        from diffjax.kernels import cpu_runtime

        dtype = cpu_runtime.effective_dtype(compute_dtype, "cpu")
        print(kernel_switch.describe(kernels, dtype), file=sys.stderr)


def configure_runtime_for(workdir: str) -> None:
    """Before any JAX computation: the run's XLA:CPU settings (``cpu_runtime.configure`` for its
    dtype and kernels), the persistent compilation cache, and one line naming its kernels."""
    from diffjax.kernels import cpu_runtime

    dtype, kernels = run_compute_dtype(workdir), run_kernels(workdir)
    cpu_runtime.configure(dtype, kernels)
    cpu_runtime.enable_compilation_cache()
    print_kernels(dtype, kernels)


def run_compute_dtype(workdir: str) -> str:
    """The run's compute dtype (``model.dtype`` of its config.json; float32 if absent)."""
    return _run_model(workdir).get("dtype", "float32")


def run_kernels(workdir: str) -> str:
    """The run's kernels (``model.kernels`` of its config.json; "tuned" if absent)."""
    return _run_model(workdir).get("kernels", "tuned")


def _run_model(workdir: str) -> dict:
    return json.loads((epath.Path(workdir) / "config.json").read_text()).get("model", {})


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
