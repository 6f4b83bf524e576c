"""``python -m lib.bench``: see :mod:`lib.bench` and ``--help``."""

import sys

from lib.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
