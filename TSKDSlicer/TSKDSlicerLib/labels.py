"""Labelled slices: which slices of a partial segmentation count as labelled (plain numpy).

A label array here is a ``(K, J, I)`` integer array on the volume grid (``slicer.util
.arrayFromVolume`` order), 0 = background. A slice along numpy axis ``a`` is ``np.take(array, s,
axis=a)``. By default a slice is labelled when it holds any label (the backend's rule,
:func:`TSKDLib.data.slices.labelled_slices`, imported here); the user can also mark slices that are
*all background* as labelled (they then teach the model where the structure is absent).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# The torch-free rules shared with the backend (importing TSKDSlicerLib puts TSKDLib on sys.path)
from TSKDLib.data.slices import format_slices as compress_ranges  # noqa: F401 - this module's API
from TSKDLib.data.slices import SPACING_EQUAL_RTOL, acquisition_axis  # noqa: F401 - this module's API
from TSKDLib.data.slices import labelled_slices
from TSKDLib.data.slices import parse_slices as parse_ranges  # noqa: F401 - this module's API
from TSKDLib.data.slices import slice_runs as _runs

ANATOMICAL_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS component of the slice normal
ORIENTATIONS = ("acquisition", "axial", "coronal", "sagittal")  # the backend's --axis choices


def slice_axis_for(direction_ijk_to_ras, orientation: str = "acquisition", size=None, spacing=None) -> int:
    """The numpy axis (0 = k, 1 = j, 2 = i) of ``arrayFromVolume`` whose slices the backend takes.

    ``direction_ijk_to_ras`` is the 3x3 direction or the 4x4 IJK-to-RAS matrix (columns i, j, k
    in RAS; with spacing in the column lengths). ``acquisition``: the volume's own stacking axis
    (:func:`acquisition_axis`; ``spacing`` defaults to the column lengths, ``size`` to no axis of
    size 1). ``axial``/``coronal``/``sagittal``: the IJK axes are assigned to R/L, A/P, S/I by
    the largest summed |cosine| (the backend's rule), and the axis assigned to S, A/P or R/L is
    the slice axis. Raises ``ValueError`` for an unknown orientation.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {list(ORIENTATIONS)}, not {orientation!r}")
    m = np.asarray(direction_ijk_to_ras, dtype=float)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    norms[norms == 0] = 1.0
    if orientation == "acquisition":
        sp = norms if spacing is None else spacing
        return 2 - acquisition_axis(size if size is not None else (2, 2, 2), sp)
    d = np.abs(m / norms)
    best, best_score = None, -1.0
    for lps in itertools.permutations(range(3)):  # lps[a]: patient axis of IJK column a
        score = sum(d[lps[a], a] for a in range(3))
        if score > best_score + 1e-6:
            best, best_score = lps, score
    column = best.index(ANATOMICAL_AXES[orientation])
    return 2 - column


def slice_counts(labels: np.ndarray, values: Mapping[int, str], axis: int = 0) -> dict[str, int]:
    """Number of slices along ``axis`` in which each class appears: ``{name: count}``."""
    return {name: len(labelled_slices(labels, axis, [value])) for value, name in values.items()}


def effective_labelled_slices(labels: np.ndarray, axis: int = 0,
                              extra_background: Iterable[int] = ()) -> list[int]:
    """Slices with any label plus the slices the user marked as labelled background, sorted."""
    n = np.asarray(labels).shape[axis]
    extra = set()
    for s in extra_background:
        s = int(s)
        if not 0 <= s < n:
            raise ValueError(f"slice {s} is outside the volume (0..{n - 1})")
        extra.add(s)
    return sorted(set(labelled_slices(labels, axis)) | extra)


def labelled_slices_spec(indices: Sequence[int]) -> str:
    """The ``--labelled-slices`` value for ``tskd train``: ``"4,11-12,20"``.

    The backend counts these indices along the *file's* sliced voxel axis (the acquisition
    axis by default), i.e. the numpy axis :func:`slice_axis_for` returns for the written image,
    in the file's own index order (no flip). Files written by
    :func:`TSKDSlicerLib.mrml_io.export_training_inputs` keep the volume's voxel grid, so the
    indices are the ones shown in Slicer for that axis. Raises ``ValueError`` when empty.
    """
    if not indices:
        raise ValueError("no labelled slice")
    return compress_ranges(indices)


#: Longest run of consecutive labelled slices accepted without asking: the method needs a few
#: slices; long runs come from 3D tools (threshold, grow from seeds, islands...) or interpolation.
MAX_CONSECUTIVE_LABELLED = 6


def label_plane_problems(labels: np.ndarray, axis: int, axis_names: Mapping[int, str] | None = None,
                         max_run: int = MAX_CONSECUTIVE_LABELLED) -> list[str]:
    """Why the labels do not look drawn slice by slice along ``axis``; empty when they do.

    Training counts every slice along ``axis`` that holds a label as *completely* labelled (all
    other voxels of it are background). That is right for slices a person drew on, and silently
    wrong for labels drawn on slices of another plane (each training slice then holds only a
    line of them) or with 3D tools (threshold, grow from seeds: every touched slice counts).

    - another plane: fewer slices along another axis hold labels than along ``axis``;
    - 3D tools: more than ``max_run`` consecutive labelled slices along ``axis``.

    ``axis_names``: ``{numpy axis: "sagittal", ...}`` for the messages.
    """
    labels = np.asarray(labels)
    names = dict(axis_names or {})
    name = names.get(axis, f"axis {axis}")
    along = labelled_slices(labels, axis)
    if not along:
        return []
    problems = []
    for other in range(labels.ndim):
        if other == axis:
            continue
        n_other = len(labelled_slices(labels, other))
        if n_other < len(along):
            problems.append(
                f"The labels look drawn on {n_other} {names.get(other, f'axis {other}')} slice(s), "
                f"but training uses {name} slices: each of the {len(along)} {name} slices they touch "
                f"would count as completely labelled. Draw on {name} slices instead.")
            break
    long_runs = [(a, b) for a, b in _runs(along) if b - a + 1 > max_run]
    if long_runs:
        spans = ", ".join(f"{a}-{b}" for a, b in long_runs[:3])
        problems.append(
            f"{sum(b - a + 1 for a, b in long_runs)} consecutive {name} slices ({spans}) hold labels: "
            f"was a 3D tool used (threshold, grow from seeds, fill between slices)? Every one of them "
            f"would count as completely labelled, and anything not labelled in them as background. "
            f"Keep labels only on slices you checked, or confirm to train on all of them.")
    return problems
