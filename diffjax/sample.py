"""``python -m diffjax.sample``: the same as ``diffjax sample`` (``diffjax.cli.sample``)."""

import sys

from diffjax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main(configure_runtime=True))
