"""``python -m batchnorm``: the command line of :mod:`batchnorm.apps.cli`."""

import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
