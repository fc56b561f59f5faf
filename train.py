r"""Train a DDPM. With no flags: the offline digits config, into ./workdirs/digits.

    python train.py                                   # configs/digits.py, a few CPU minutes
    python train.py --config=configs/cifar10.py --workdir=gs://BUCKET/cifar10 \
        --config.data.data_dir=gs://BUCKET/tfds --config.training.batch_size=256

Any config field can be overridden with ``--config.SECTION.FIELD=VALUE``. Starting again in a
workdir that has a checkpoint resumes from it. On a multi-host TPU pod run the same command on
every worker (see ``diffjax.training.loop.initialize_distributed`` for the environment it reads).
"""

# The same as `diffjax train`; the code is diffjax/cli/train.py.

from absl import flags
from ml_collections import config_flags  # noqa: F401 - used as train.config_flags

from diffjax.cli import train as _cli
from diffjax.cli.train import _CONFIG, _WORKDIR, default_workdir, main  # noqa: F401

# `python train.py --help` lists --config and --workdir as this file's flags, as before.
flags.adopt_module_key_flags(_cli)

if __name__ == "__main__":
    main()
