"""Errors whose message is the whole explanation, and how a command line reports them.

:class:`ReportableError` is the base of every error whose message alone tells a command-line user
what is wrong and what to do (an invalid config, an unusable workdir or checkpoint, a diverged
run); :func:`exit_on_reportable_error` prints it as ``error: ...`` without a traceback and exits
with its ``exit_code`` (2 for a :class:`ConfigError`, a usage error; else 1).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn, TextIO

__all__ = [
    "CONFIG_ERROR_EXIT_CODE",
    "ConfigError",
    "ReportableError",
    "exit_on_config_error",
    "exit_on_reportable_error",
    "exit_with_config_error",
    "format_config_error",
]

CONFIG_ERROR_EXIT_CODE = 2  # the usual exit status of a command-line usage error


class ReportableError(Exception):
    """An error whose message alone tells a command-line user what is wrong and what to do.

    A command line prints it as ``error: <message>`` without a traceback and exits with
    ``exit_code`` (see :func:`exit_on_reportable_error`).
    """

    exit_code: int = 1


class ConfigError(ReportableError, ValueError):
    """A config with one or more problems; ``problems`` holds one line per problem."""

    exit_code = CONFIG_ERROR_EXIT_CODE

    def __init__(self, problems: Sequence[str]):
        self.problems: tuple[str, ...] = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


def format_config_error(err: ReportableError) -> str:
    """The message a command line prints (for a ConfigError: a header and one line per problem)."""
    return str(err)


def exit_with_config_error(err: ReportableError, stream: TextIO | None = None) -> NoReturn:
    """Print ``err`` as ``error: ...`` without a traceback and exit with its status."""
    print(f"error: {format_config_error(err)}", file=stream or sys.stderr, flush=True)
    raise SystemExit(err.exit_code)


@contextmanager
def exit_on_reportable_error(stream: TextIO | None = None) -> Iterator[None]:
    """Turn a :class:`ReportableError` raised in the block into ``error: ...`` and an exit.

    The status is the error's ``exit_code``: 2 for a :class:`ConfigError` (a usage error),
    1 otherwise (e.g. a diverged run, an unusable workdir or checkpoint).
    """
    try:
        yield
    except ReportableError as err:
        exit_with_config_error(err, stream)


# The name command lines have used; it handles every ReportableError, configs included.
exit_on_config_error = exit_on_reportable_error
