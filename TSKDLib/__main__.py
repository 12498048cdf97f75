"""``python -m TSKDLib`` runs the ``tskd`` command (as Slicer's Python does)."""

import sys

from .cli import main

sys.exit(main())
