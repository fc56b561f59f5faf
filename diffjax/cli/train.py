"""``diffjax train`` / ``python train.py``: train a DDPM (an absl app; ml_collections config).

With no flags: the offline digits config (``configs/digits.py``), into ``./workdirs/digits``.
Any config field can be overridden with ``--config.SECTION.FIELD=VALUE``; an override that names
no field of the config is one ``error:`` line per bad override and exit status 2, before the
flags are parsed. Starting again in a workdir that has a checkpoint resumes from it. On a
multi-host TPU pod run the same command on every worker (see
``diffjax.training.multihost.initialize_distributed`` for the environment it reads).

Importing this module defines the absl flags ``--config`` and ``--workdir`` and reads nothing
from ``sys.argv``; :func:`main` checks the overrides and parses the flags. Errors (a bad config,
an unusable workdir, a dataset that is not prepared, a diverged run) are one ``error: ...``
line through ``diffjax.errors.exit_on_reportable_error``, with the error's exit status.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from diffjax.config.validation import exit_on_unknown_overrides
from diffjax.errors import UsageError, exit_on_reportable_error

__all__ = ["DEFAULT_CONFIG", "default_workdir", "help_text", "main"]

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "digits.py"

# The command line the config flag reads its overrides from: filled in by main() just before
# the flags are parsed, so that defining the flag (at import) reads no sys.argv.
_FLAG_ARGV: list[str] = []

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    default=str(DEFAULT_CONFIG),
    help_string="Training config file (configs/*.py); default: the offline digits config.",
    lock_config=True,
    sys_argv=_FLAG_ARGV,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory (local or gs://) for config.json, checkpoints, samples and TensorBoard "
    "events. Default: workdirs/<config file name>.",
)

_HELP_FLAGS = ("-h", "--help", "-help", "-?")


def default_workdir(config_path: str) -> str:
    """``workdirs/<config file stem>``, relative to the current directory."""
    return str(pathlib.Path("workdirs") / pathlib.Path(config_path.split(":")[0]).stem)


def help_text(prog: str) -> str:
    """``PROG --help``: what the command does, its flags and how overrides work."""
    usage = (
        f"usage: {prog} [--config=FILE[:ARG]] [--workdir=DIR] [--config.SECTION.FIELD=VALUE ...]"
    )
    return f"""{usage}

Train a DDPM. With no flags: the offline digits config, into ./workdirs/digits.

flags:
  --config=FILE[:ARG]   training config file (configs/*.py); default: {DEFAULT_CONFIG}
  --workdir=DIR         run directory (local or gs://) for config.json, checkpoints, samples
                        and TensorBoard events; default: workdirs/<config file name>
  --config.SECTION.FIELD=VALUE
                        override one field of the config (after --config if given), e.g.
                        --config.training.batch_size=256 --config.data.data_dir=gs://BUCKET/tfds;
                        booleans also as --config.SECTION.FIELD / --noconfig.SECTION.FIELD.
                        A field the config does not have is an error naming the allowed ones.

Starting again in a workdir that has a checkpoint resumes from it. absl's own flags
(--verbosity, --flagfile, ...): {prog} --helpfull.

examples:
  {prog}                                   # configs/digits.py, a few CPU minutes
  {prog} --config=configs/cifar10.py --workdir=gs://BUCKET/cifar10 \\
      --config.data.data_dir=gs://BUCKET/tfds --config.training.batch_size=256
"""


def _config_given(argv: Sequence[str]) -> bool:
    return any(
        a in ("--config", "-config") or a.startswith(("--config=", "-config=")) for a in argv
    )


def _train(argv: list[str]) -> None:
    """The absl main: flags are parsed."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from diffjax.kernels import cpu_runtime
    from diffjax.training import loop as training

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    # Before any JAX computation: XLA:CPU's settings for speed (diffjax/kernels/cpu_runtime.py),
    # then this process joins the other processes of a multi-host run.
    cpu_runtime.configure(_CONFIG.value.model.dtype, _CONFIG.value.model.kernels)
    cpu_runtime.enable_compilation_cache()
    training.initialize_distributed()
    workdir = _WORKDIR.value or default_workdir(
        config_flags.get_config_filename(flags.FLAGS["config"])
    )
    training.train_and_evaluate(_CONFIG.value, workdir)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> None:
    """Train with the command line ``argv`` (default ``sys.argv``; ``argv[0]`` is the program).

    ``prog``: given (``diffjax train``), ``-h``/``--help`` print :func:`help_text` and exit 0;
    else absl prints its help (``python train.py --help``, as before).
    """
    argv = list(sys.argv if argv is None else argv)
    if prog is not None and any(a in _HELP_FLAGS for a in argv[1:]):
        print(help_text(prog), end="")
        raise SystemExit(0)
    with exit_on_reportable_error():
        # A locked config rejects unknown override keys with a traceback from inside flag
        # parsing: name them in one line first.
        exit_on_unknown_overrides(argv, str(DEFAULT_CONFIG))
        if not _config_given(argv):
            # The flag parses its default at definition, when it did not see the overrides:
            # parse it again, with them.
            argv.insert(1, f"--config={DEFAULT_CONFIG}")
        _FLAG_ARGV[:] = argv
        app.run(_train, argv=argv)
