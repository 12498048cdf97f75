"""Fill between slices: ITK's morphological contour interpolation of sparse slice labels.

This is what 3D Slicer's Segment Editor effect "Fill between slices" runs
(``itk::MorphologicalContourInterpolator``; Albu, Beugeling and Laurendeau, "A morphology-based
approach for interslice interpolation of anatomical slices from volumetric images", IEEE TBME
55(8), 2008; ITK remote module by Zukić et al., Insight Journal 2016). TSKD uses it as the
radiologist's no-training baseline in the sparse-slice benchmark and as a prior between labelled
slices.

The filter comes from the PyPI package ``itk-morphologicalcontourinterpolation`` (ITK's Python
wrapping). ITK's Python libraries and SimpleITK's statically linked ITK corrupt each other's heap
when both are loaded in one process (seen here: ``malloc(): unaligned fastbin chunk detected`` at
exit), so the filter always runs in a child process that never imports SimpleITK or torch; the
arrays travel through ``.npy`` files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from TSKDLib.errors import ConfigError


def fill_between_slices(labels: np.ndarray, labelled: Sequence[int] | np.ndarray, timeout: float = 600.0) -> np.ndarray:
    """Interpolate label maps drawn on a few slices onto the slices between them.

    Parameters
    ----------
    labels:
        ``(N, H, W)`` integer class indices ``0..K`` stacked along the slice axis (axis 0 is the
        slice axis; the in-plane axes are the slices' rows and columns). Only the slices listed
        in ``labelled`` are read; every other slice is treated as unlabelled.
    labelled:
        Indices of the labelled slices along axis 0 (or an ``(N,)`` bool mask).

    Returns
    -------
    ``(N, H, W)`` uint8/uint16 labels: the labelled slices unchanged, each class interpolated
    between its own first and last labelled slice (the filter works per label value, on the
    slice axis only), background beyond them. Nothing is extrapolated past a class's outermost
    labelled slice.

    Raises
    ------
    ConfigError
        The ITK package is missing (install ``itk-morphologicalcontourinterpolation``) or the
        child process failed.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (N, H, W), got shape {labels.shape}.")
    idx = np.asarray(labelled)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    sparse = np.zeros(labels.shape, dtype)
    sparse[idx] = labels[idx]
    if len(idx) < 2:
        return sparse
    with tempfile.TemporaryDirectory(prefix="tskd-fill-") as tmp:
        src, dst = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
        np.save(src, sparse)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME",)}
        proc = subprocess.run([sys.executable, "-m", "TSKDLib.evaluation.interpolation", str(src), str(dst)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not dst.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            if "No module named 'itk'" in (proc.stderr or ""):
                raise ConfigError("fill between slices needs ITK's contour interpolation.",
                                  fix="pip install itk-morphologicalcontourinterpolation")
            raise ConfigError(f"fill between slices failed ({tail[0]}).")
        out = np.load(dst)
    out[idx] = labels[idx]  # the drawn slices stay exactly as drawn
    return out.astype(dtype, copy=False)


def _worker(src: str, dst: str) -> None:
    """Child process: read ``src`` (N, H, W), interpolate along axis 0, write ``dst``."""
    import itk  # noqa: PLC0415 - only here, never next to SimpleITK

    arr = np.load(src)
    image = itk.image_from_array(np.ascontiguousarray(arr))
    # ITK index axis 2 = numpy axis 0 (the slice axis)
    out = itk.morphological_contour_interpolator(image, axis=2)
    np.save(dst, itk.array_from_image(out).astype(arr.dtype, copy=False))
    sys.stdout.flush()
    os._exit(0)  # skip ITK's static destructors (nothing left to clean up)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
