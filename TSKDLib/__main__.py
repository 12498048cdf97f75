"""``python -m TSKDLib`` runs the ``tskd`` command (as Slicer's Python does)."""

import sys

from TSKDLib.cli.main import main

sys.exit(main())
