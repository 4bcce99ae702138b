"""``python -m htmuon_dist.diagnostics PATH``: the same as ``htmuon-diagnose PATH``."""

import sys

from .cli import main

sys.exit(main())
