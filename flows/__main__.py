"""``python -m flows <stage> [--params P] [key=value ...]``: ``flows.cli``."""

import sys

from flows.cli import main

sys.exit(main(sys.argv[1:]))
