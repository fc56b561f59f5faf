"""``python -m diffjax.evaluate``: the same as ``diffjax evaluate`` (``diffjax.cli.evaluate``)."""

import sys

from diffjax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(configure_runtime=True))
