r"""Train a DDPM. With no flags: the offline digits config, into ./workdirs/digits.

    python train.py                                   # configs/digits.py, a few CPU minutes
    python train.py --config=configs/cifar10.py --workdir=gs://BUCKET/cifar10 \
        --config.data.data_dir=gs://BUCKET/tfds --config.training.batch_size=256

Any config field can be overridden with ``--config.SECTION.FIELD=VALUE``. Starting again in a
workdir that has a checkpoint resumes from it. On a multi-host TPU pod run the same command on
every worker (see ``diffjax.training.loop.initialize_distributed`` for the environment it reads).
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffjax.config.validation import exit_on_config_error, exit_on_unknown_overrides
from diffjax.data.pipeline import DatasetNotPreparedError
from diffjax.kernels import cpu_runtime
from diffjax.training import loop as training

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent / "configs" / "digits.py"
# A locked config rejects unknown override keys with a traceback from inside flag parsing: name
# them in one line first.
exit_on_unknown_overrides(sys.argv, str(_DEFAULT_CONFIG))

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    default=str(_DEFAULT_CONFIG),
    help_string="Training config file (configs/*.py); default: the offline digits config.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory (local or gs://) for config.json, checkpoints, samples and TensorBoard "
    "events. Default: workdirs/<config file name>.",
)


def default_workdir(config_path: str) -> str:
    """``workdirs/<config file stem>``, relative to the current directory."""
    return str(pathlib.Path("workdirs") / pathlib.Path(config_path.split(":")[0]).stem)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    # Before any JAX computation: XLA:CPU's settings for speed (diffjax/kernels/cpu_runtime.py),
    # then
    # this process joins the other processes of a multi-host run.
    cpu_runtime.configure(_CONFIG.value.model.dtype)
    cpu_runtime.enable_compilation_cache()
    training.initialize_distributed()
    workdir = _WORKDIR.value or default_workdir(
        config_flags.get_config_filename(flags.FLAGS["config"])
    )
    with exit_on_config_error():
        try:
            training.train_and_evaluate(_CONFIG.value, workdir)
        except DatasetNotPreparedError as err:
            sys.exit(f"error: {err}")


if __name__ == "__main__":
    app.run(main)
