"""TSKDSlicerLib: the plain-Python parts of the TSKD Slicer module (no Slicer or Qt, except
``mrml_io`` and ``cases``).

The module shares a few torch-free rules with the backend (``TSKDLib.data.slices``: which slice is
labelled, slice-range text). ``TSKDLib`` is installed next to ``TSKDSlicer.py`` in the packaged
extension and sits at the repository root in a source tree; importing this package makes it
importable in both cases (:func:`backend_pythonpath`).
"""

from __future__ import annotations

import os
import sys


def backend_pythonpath(module_dir: str | None = None) -> list[str]:
    """Folders to put on ``PYTHONPATH`` so ``TSKDLib`` and ``TSKDSlicerLib`` import.

    Packaged extension: ``TSKDLib`` is installed next to ``TSKDSlicer.py`` (the module dir).
    Source tree: ``TSKDLib`` is at the repository root, one level above the module dir.
    """
    module_dir = module_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [module_dir]
    parent = os.path.dirname(module_dir)
    if not os.path.isdir(os.path.join(module_dir, "TSKDLib")) and os.path.isdir(os.path.join(parent, "TSKDLib")):
        paths.append(parent)
    return paths


for _path in backend_pythonpath()[1:]:  # the source tree's root, after everything already there
    if _path not in sys.path:
        sys.path.append(_path)
