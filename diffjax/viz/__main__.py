"""``python -m diffjax.viz --workdir=RUN``: write every figure of a run into RUN/figures."""

import sys

from diffjax.viz.run_figures import main

if __name__ == "__main__":
    sys.exit(main())
