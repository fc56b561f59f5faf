"""The ``diffjax`` command: ``diffjax SUBCOMMAND [FLAGS]`` (also ``python -m diffjax``).

Each subcommand is the command line of the same name, with the same flags and output:
``diffjax train`` is ``python train.py``, ``diffjax sample`` is ``python -m diffjax.sample``, and
so on. ``diffjax --help`` lists the subcommands; ``diffjax SUBCOMMAND --help`` lists its flags.
A missing or unknown subcommand is one ``diffjax: error: ...`` line and exit status 2.

Importing this module imports no jax: a subcommand's module is imported when it runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from diffjax.errors import UsageError, exit_on_reportable_error

__all__ = ["COMMANDS", "help_text", "main"]

_PROG = "diffjax"


def _train(argv: list[str], prog: str) -> int:
    from diffjax.cli import train

    train.main([prog, *argv], prog=prog)
    return 0


def _sample(argv: list[str], prog: str) -> int:
    from diffjax.cli import sample

    return sample.main(argv, configure_runtime=True, prog=prog)


def _evaluate(argv: list[str], prog: str) -> int:
    from diffjax.cli import evaluate

    return evaluate.main(argv, configure_runtime=True, prog=prog)


def _convert(argv: list[str], prog: str) -> int:
    from diffjax.convert import weights

    weights.main(argv, prog=prog)
    return 0


def _viz(argv: list[str], prog: str) -> int:
    from diffjax.viz import run_figures

    return run_figures.main(argv, prog=prog)


# name: (one line of help, runner(argv after the name, prog) -> exit status)
COMMANDS: dict[str, tuple[str, Callable[[list[str], str], int]]] = {
    "train": ("train a DDPM from a config file (configs/*.py) into a workdir", _train),
    "sample": ("draw samples of a trained run: a PNG grid and an .npz", _sample),
    "evaluate": ("bits/dim, FID, Inception Score or the digits FD of a trained run", _evaluate),
    "convert": ("convert a diffusers UNet2DModel (Hugging Face) into a diffjax run", _convert),
    "viz": ("write every figure of a trained run into RUN/figures", _viz),
}


def help_text() -> str:
    """``diffjax --help``."""
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {_PROG} {{{','.join(COMMANDS)}}} [FLAGS]",
        "",
        "Denoising diffusion probabilistic models (DDPM) in JAX/Flax.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, (summary, _) in COMMANDS.items()),
        "",
        f"'{_PROG} COMMAND --help' lists the flags of a command.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``diffjax ARGV`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(help_text(), end="")
        return 0
    with exit_on_reportable_error(prog=_PROG):
        choices = ", ".join(COMMANDS)
        if not argv:
            raise UsageError(f"no command given; choose one of {choices} ({_PROG} --help)")
        name, rest = argv[0], argv[1:]
        if name not in COMMANDS:
            raise UsageError(f"unknown command {name!r}; choose one of {choices}")
    return COMMANDS[name][1](rest, f"{_PROG} {name}")


if __name__ == "__main__":
    sys.exit(main())
