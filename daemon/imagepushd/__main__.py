"""``python -m imagepushd``: the same entry point as the console script."""

import sys

from imagepushd.cli import main

sys.exit(main())
