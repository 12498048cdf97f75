"""Labelled slices and slice-range text: the rules shared by the backend and the Slicer module.

This module imports only the standard library and NumPy, so the Slicer module's own process
(which never imports PyTorch) uses it too (``TSKDSlicerLib.labels``). The two rules here are the
contract across the process boundary:

- **A labelled slice is one holding any label** (any non-zero value, or any of the given values):
  :func:`labelled_mask` / :func:`labelled_slices`. The Slicer module writes the labelled slices
  it found; ``tskd train`` finds the same ones in the label file when none are listed.
- **The acquisition (stacking) axis** of a volume from its header (:func:`acquisition_axis`), so
  the module counts and numbers slices along the axis the backend slices.
- **Slice ranges** are written ``"4,11-12,20"`` (:func:`format_slices`) and read back by
  :func:`parse_slices` (``tskd inspect/train --labelled-slices``, the module's "background slices"
  field). Indices are 0-based voxel indices along the slice axis.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def labelled_mask(labels: np.ndarray, axis: int = 0, values: Iterable[int] | None = None) -> np.ndarray:
    """Which slices along ``axis`` hold a label.

    ``labels``: integer label array of any dimension (e.g. ``(N, H, W)`` with ``axis=0``), 0 =
    background. ``values``: when given, only these label values count (e.g. one class).
    Returns a ``(labels.shape[axis],)`` bool array: True where the slice holds any non-zero value
    (or any of ``values``).
    """
    labels = np.asarray(labels)
    mask = labels != 0 if values is None else np.isin(labels, list(values))
    return mask.any(axis=tuple(a for a in range(labels.ndim) if a != axis))


def labelled_slices(labels: np.ndarray, axis: int = 0, values: Iterable[int] | None = None) -> list[int]:
    """Indices (ascending) of the slices along ``axis`` that hold any label (or any of
    ``values``): the indices where :func:`labelled_mask` is True."""
    return [int(s) for s in np.flatnonzero(labelled_mask(labels, axis, values))]


def format_slices(indices: Sequence[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1-3,7,9-10"`` (sorted, unique; ``""`` when empty)."""
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in slice_runs(indices)]
    return ",".join(parts)


def slice_runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of consecutive indices, ``[1, 2, 3, 7]`` -> ``[(1, 3), (7, 7)]`` (sorted, unique)."""
    runs: list[tuple[int, int]] = []
    for v in sorted(set(int(i) for i in indices)):
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


def parse_slices(text: str) -> list[int]:
    """``"3,7,10-12"`` -> ``[3, 7, 10, 11, 12]``: the inverse of :func:`format_slices`.

    Spaces are ignored, empty items skipped; the result is sorted and unique. Raises
    ``ValueError`` for a malformed item, a negative index or a range whose end is below its start.
    """
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if part.startswith("-"):
            raise ValueError(f"slice indices are 0 or more, not {part!r}")
        if "-" in part:
            a, b = (int(x) for x in part.split("-", 1))
            if b < a:
                raise ValueError(f"bad slice range {part!r}: the end is below the start")
            out.update(range(a, b + 1))
        else:
            out.add(int(part))
    return sorted(out)


#: Relative tolerance under which two voxel spacings count as equal.
SPACING_EQUAL_RTOL = 1e-2


def acquisition_axis(size, spacing) -> int:
    """The file's stacking axis (ITK index axis: 0 = i, 1 = j, 2 = k) from its size and spacing.

    Rule, in order: an image with exactly one axis of size 1 (a 2D image as a one-slice volume)
    stacks along that axis; isotropic voxels (all spacings equal within 1 %) -> k; two equal
    spacings (square in-plane pixels) -> the third axis, thicker or thinner; otherwise the axis
    with the largest spacing (ties -> k). Pure function of the header (no pixel data)."""
    size, sp = list(size), [float(s) for s in spacing]
    if len(size) != 3 or len(sp) != 3:
        raise ValueError("acquisition_axis expects a 3D size and spacing")
    ones = [a for a in range(3) if size[a] == 1]
    if len(ones) == 1:
        return ones[0]

    def eq(a, b):
        return abs(sp[a] - sp[b]) <= SPACING_EQUAL_RTOL * max(sp[a], sp[b])

    pairs = [(a, b) for a, b in ((0, 1), (0, 2), (1, 2)) if eq(a, b)]
    if len(pairs) == 3:
        return 2
    if len(pairs) == 1:
        return ({0, 1, 2} - set(pairs[0])).pop()
    best = max(sp)
    return 2 if sp[2] >= best * (1 - 1e-9) else int(np.argmax(sp))
