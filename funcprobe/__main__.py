"""``python -m funcprobe``: the command line (``funcprobe.apps.cli``)."""

import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
