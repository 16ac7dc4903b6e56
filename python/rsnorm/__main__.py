"""``python -m rsnorm``: the same command line as the ``rsnorm`` console script."""

import sys

from .cli import main

sys.exit(main())
