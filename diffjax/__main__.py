"""``python -m diffjax SUBCOMMAND [FLAGS]``: the same as the ``diffjax`` command."""

import sys

from diffjax.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
