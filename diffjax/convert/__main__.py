"""``python -m diffjax.convert``: the same as ``diffjax convert``."""

from diffjax.convert.weights import main

if __name__ == "__main__":
    main()
