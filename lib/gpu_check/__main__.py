"""``python -m lib.gpu_check``: see :mod:`lib.gpu_check`."""

import sys

from lib.gpu_check.cli import main

sys.exit(main())
