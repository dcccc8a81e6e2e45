"""``python -m peerd.cli``: the same as the ``peerd`` command (as before the split)."""

import sys

from peerd.cli import main

sys.exit(main())
