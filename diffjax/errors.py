"""Errors whose message is the whole explanation, and how a command line reports them.

:class:`ReportableError` is the base of every error whose message alone tells a command-line user
what is wrong and what to do (an invalid config, a bad flag, a dataset that is not prepared, an
unusable workdir or checkpoint, a diverged run). Every command line reports them through one
handler, :func:`exit_on_reportable_error` (or :func:`report_and_exit` where it must stop at
once): ``[PROG: ]error: ...`` on stderr without a traceback, and the error's ``exit_code``
(2 for a :class:`UsageError` or a :class:`ConfigError`; else 1).
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
    "UsageError",
    "exit_on_config_error",
    "exit_on_reportable_error",
    "exit_with_config_error",
    "format_config_error",
    "report_and_exit",
]

CONFIG_ERROR_EXIT_CODE = 2  # the usual exit status of a command-line usage error


class ReportableError(Exception):
    """An error whose message alone tells a command-line user what is wrong and what to do.

    A command line prints it as ``error: <message>`` without a traceback and exits with
    ``exit_code`` (see :func:`exit_on_reportable_error`).
    """

    exit_code: int = 1


class UsageError(ReportableError):
    """A bad flag value or an unusable run or file; the message is kept to one line."""

    exit_code = CONFIG_ERROR_EXIT_CODE

    def __init__(self, message: object):
        super().__init__(" ".join(str(message).split()))


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


def report_and_exit(
    err: ReportableError, stream: TextIO | None = None, *, prog: str | None = None
) -> NoReturn:
    """Print ``err`` as ``[PROG: ]error: ...`` without a traceback and exit with its status."""
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {format_config_error(err)}", file=stream or sys.stderr, flush=True)
    raise SystemExit(err.exit_code)


# The name used before report_and_exit; the same function.
exit_with_config_error = report_and_exit


@contextmanager
def exit_on_reportable_error(
    stream: TextIO | None = None, *, prog: str | None = None
) -> Iterator[None]:
    """Turn a :class:`ReportableError` raised in the block into ``[PROG: ]error: ...`` and an exit.

    The status is the error's ``exit_code``: 2 for a :class:`UsageError` or a
    :class:`ConfigError` (usage errors), 1 otherwise (e.g. a diverged run, an unusable workdir
    or checkpoint, a dataset that is not prepared). ``prog``: the command's name, printed
    before ``error:`` (the sample/evaluate/convert/viz command lines name themselves; train
    prints a bare ``error:``).
    """
    try:
        yield
    except ReportableError as err:
        report_and_exit(err, stream, prog=prog)


# The name command lines have used; it handles every ReportableError, configs included.
exit_on_config_error = exit_on_reportable_error
