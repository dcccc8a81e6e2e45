"""``python -m peerd``: the same as the ``peerd`` command."""

import sys

from peerd.cli import main

sys.exit(main())
