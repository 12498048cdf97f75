"""Image geometry: pairing labels with images through physical space, canonical orientation.

Coordinates follow ITK/DICOM: physical points are in LPS millimetres; an image's index-to-point
map is ``p = origin + direction @ (spacing * index)``. A label must land on the voxel it was drawn
on, so labels are brought onto an image grid by resampling through physical space (nearest
neighbour), never by matching array shapes.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import SimpleITK as sitk

from TSKDLib.errors import GeometryError

#: Tolerances for "same grid": origin in mm, spacing relative, direction cosines absolute.
ORIGIN_TOL_MM = 1e-3
SPACING_RTOL = 1e-5
DIRECTION_TOL = 1e-5

#: Slice axes in the canonical LPS-oriented array (z, y, x): axial slices stack along z (0),
#: coronal along y (1), sagittal along x (2).
SLICE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}


class LabelGeometryWarning(UserWarning):
    """Labels were resampled onto the image grid because their grids differ."""


def describe_geometry(image: sitk.Image) -> str:
    """One-line description of an image grid: size, spacing (mm), origin (LPS mm), direction."""
    d = np.round(np.array(image.GetDirection()), 4).tolist()
    return (f"size={list(image.GetSize())} spacing={[round(s, 5) for s in image.GetSpacing()]} "
            f"origin={[round(o, 3) for o in image.GetOrigin()]} direction={d}")


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True if both images share size, spacing, origin and direction (within tolerances)."""
    return (a.GetDimension() == b.GetDimension() and a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=SPACING_RTOL, atol=0)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=ORIGIN_TOL_MM)
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=DIRECTION_TOL))


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box (mm) of the image's voxels, including the half-voxel border.

    Returns ``(lower, upper)``, each of shape ``(3,)`` (or ``(D,)``)."""
    size = np.array(image.GetSize())
    corners = []
    for corner in itertools.product(*[(-0.5, s - 0.5) for s in size]):
        corners.append(image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner]))
    corners = np.array(corners)
    return corners.min(axis=0), corners.max(axis=0)


def overlap_fraction(image: sitk.Image, labels: sitk.Image) -> float:
    """Fraction of the image's bounding-box volume that the label volume's bounding box covers."""
    lo_a, hi_a = physical_bounds(image)
    lo_b, hi_b = physical_bounds(labels)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None)
    vol_a = np.prod(hi_a - lo_a)
    return float(np.prod(inter) / vol_a) if vol_a > 0 else 0.0


def pair_labels_with_image(image: sitk.Image, labels: sitk.Image, label_path: str | None = None,
                           image_path: str | None = None) -> sitk.Image:
    """Bring a label volume onto an image's grid through physical space.

    - Same grid (size, spacing, origin, direction): returned unchanged.
    - Different grid that overlaps the image: resampled with nearest neighbour onto the image grid
      (label value 0 outside the label volume) and a :class:`LabelGeometryWarning` is issued.
    - No overlap: :class:`GeometryError` naming both geometries.

    Parameters
    ----------
    image, labels:
        SimpleITK images of the same dimension; ``labels`` holds integer label values.

    Returns
    -------
    sitk.Image
        Labels on the image grid, same pixel type as ``labels``.
    """
    if labels.GetDimension() != image.GetDimension():
        raise GeometryError(
            f"label volume is {labels.GetDimension()}D but the image is {image.GetDimension()}D.",
            label_path, "Use a label volume drawn on this image.")
    if same_grid(image, labels):
        # Copy the image's exact geometry so tiny float differences never propagate.
        out = sitk.Image(labels)
        out.CopyInformation(image)
        return out
    if overlap_fraction(image, labels) <= 0.0:
        raise GeometryError(
            "label volume does not overlap the image in physical space. "
            f"Image {image_path or ''}: {describe_geometry(image)}; labels: {describe_geometry(labels)}.",
            label_path, "Check that the labels belong to this image (and its origin/direction).")
    warnings.warn(
        f"{label_path or 'labels'}: grid differs from the image grid "
        f"(labels {describe_geometry(labels)} vs image {describe_geometry(image)}); "
        "resampled onto the image grid with nearest neighbour.", LabelGeometryWarning, stacklevel=2)
    return sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         labels.GetPixelID())


def orientation_code(image: sitk.Image) -> str:
    """Three-letter DICOM orientation code of the image axes (e.g. ``"LPS"``, ``"RAS"``)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_canonical(image: sitk.Image) -> sitk.Image:
    """Reorient exactly (axis permutation and flips, no interpolation) so the axes are L, P, S.

    The array of the result (``sitk.GetArrayViewFromImage``) is indexed ``(z, y, x)`` with
    x towards patient left, y towards posterior and z towards superior. For oblique images the
    closest axis-aligned orientation is used (the residual rotation stays in the direction
    matrix)."""
    if image.GetDimension() != 3:
        raise ValueError("to_canonical expects a 3D image")
    return sitk.DICOMOrient(image, "LPS")


def from_canonical(canonical: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Exact inverse of :func:`to_canonical`: put ``canonical`` back onto ``reference``'s grid.

    Raises :class:`GeometryError` if the result does not land exactly on the reference grid."""
    out = sitk.DICOMOrient(canonical, orientation_code(reference))
    if out.GetSize() != reference.GetSize() or not np.allclose(
            out.GetSpacing(), reference.GetSpacing(), rtol=1e-5):
        raise GeometryError(f"cannot map back onto the reference grid ({describe_geometry(out)} vs "
                            f"{describe_geometry(reference)}).")
    if not (np.allclose(out.GetOrigin(), reference.GetOrigin(), atol=1e-2)
            and np.allclose(out.GetDirection(), reference.GetDirection(), atol=1e-4)):
        raise GeometryError(f"reoriented grid does not match the reference ({describe_geometry(out)} "
                            f"vs {describe_geometry(reference)}).")
    out.CopyInformation(reference)
    return out


# ------------------------------------------------------------------------------------------------
# Slice frames: which voxel axis is sliced, exactly (permutation and flips, no interpolation)
# ------------------------------------------------------------------------------------------------
#: Slice axis choices. ``acquisition`` (default): the voxel axis along which the file stacks its
#: slices, whatever its direction in the patient; the others: the patient axis closest to it.
AXIS_CHOICES = ("acquisition", "axial", "coronal", "sagittal")
DEFAULT_AXIS = "acquisition"
# The stacking-axis rule is shared with the Slicer module's process (torch- and SimpleITK-free):
from TSKDLib.data.slices import SPACING_EQUAL_RTOL, acquisition_axis  # noqa: E402,F401
#: Two acquisition planes match when their slice normals are within this angle (degrees).
PLANE_MATCH_DEG = 45.0
_SCORE_TOL = 1e-6


def _best_assignment(direction: np.ndarray, file_axes, lps_candidates=None):
    """Assign each of ``file_axes`` a distinct LPS axis maximising the summed |cosines|.
    Ties (within 1e-6) go to the first permutation in itertools order (deterministic)."""
    best, best_score = None, -1.0
    for lps in itertools.permutations(range(3), len(file_axes)):
        score = sum(abs(direction[p, a]) for p, a in zip(lps, file_axes))
        if score > best_score + _SCORE_TOL:
            best, best_score = lps, score
    return dict(zip(file_axes, best))


class SliceFrame:
    """An exact reordering of a 3D image's voxels into slices: frame array ``(N, H, W)``.

    The frame has ITK axes ``m = 0`` (columns, W), ``1`` (rows, H) and ``2`` (slices, N); frame
    axis ``m`` is file axis ``perm[m]`` (ITK order i, j, k), run backwards when ``flip[m]``. The
    frame image keeps every voxel's physical position (LPS mm): only the index order changes,
    so :meth:`to_original` is an exact inverse (voxel for voxel, no interpolation).

    Build one with :func:`slice_frame`. Attributes: ``axis`` (the choice), ``perm``, ``flip``,
    ``size`` (file size, ITK order)."""

    def __init__(self, axis: str, perm, flip, size):
        self.axis = axis
        self.perm = tuple(int(p) for p in perm)
        self.flip = tuple(bool(f) for f in flip)
        self.size = tuple(int(s) for s in size)
        if sorted(self.perm) != [0, 1, 2]:
            raise ValueError(f"not a permutation: {self.perm}")

    def __repr__(self) -> str:
        return f"SliceFrame(axis={self.axis!r}, perm={self.perm}, flip={self.flip}, size={self.size})"

    @property
    def file_slice_axis(self) -> int:
        """ITK index axis of the file (0 = i, 1 = j, 2 = k) along which slices are taken."""
        return self.perm[2]

    @property
    def num_slices(self) -> int:
        return self.size[self.perm[2]]

    # numpy axes of a file array are (k, j, i): ITK axis a is numpy axis 2 - a.
    def to_array(self, file_array: np.ndarray) -> np.ndarray:
        """File-ordered array ``(k, j, i)`` (``sitk.GetArrayViewFromImage``) -> frame array
        ``(N, H, W)`` (a view; copy with ``np.ascontiguousarray`` if needed)."""
        arr = np.transpose(file_array, (2 - self.perm[2], 2 - self.perm[1], 2 - self.perm[0]))
        sl = tuple(slice(None, None, -1) if self.flip[m] else slice(None) for m in (2, 1, 0))
        return arr[sl]

    def from_array(self, frame_array: np.ndarray) -> np.ndarray:
        """Exact inverse of :meth:`to_array`: ``(N, H, W)`` -> file order ``(k, j, i)``."""
        frame_array = np.asarray(frame_array)
        expected = (self.size[self.perm[2]], self.size[self.perm[1]], self.size[self.perm[0]])
        if frame_array.shape != expected:
            raise ValueError(f"frame array of shape {frame_array.shape} does not fit the frame {expected}.")
        sl = tuple(slice(None, None, -1) if self.flip[m] else slice(None) for m in (2, 1, 0))
        arr = frame_array[sl]
        # frame numpy axis n holds file ITK axis perm[2 - n]; file numpy axis q is ITK axis 2 - q
        inv = [0, 0, 0]
        for n in range(3):
            inv[2 - self.perm[2 - n]] = n
        return np.transpose(arr, inv)

    def frame_image(self, image: sitk.Image) -> sitk.Image:
        """The image with its voxels in frame order and the matching geometry (same physical
        positions): spacing ``(W, H, N)`` mm, direction columns = the file's axes permuted and
        sign-flipped, origin = physical position of the first frame voxel."""
        arr = np.ascontiguousarray(self.to_array(sitk.GetArrayViewFromImage(image)))
        out = sitk.GetImageFromArray(arr, isVector=image.GetNumberOfComponentsPerPixel() > 1)
        g = self.frame_geometry(image)
        out.SetSpacing(g.spacing.tolist())
        out.SetDirection(g.direction.flatten().tolist())
        out.SetOrigin(g.origin.tolist())
        return out

    def frame_geometry(self, image: sitk.Image) -> ArrayGeometry:
        """The :class:`ArrayGeometry` of the frame array ``(N, H, W)`` of ``image`` (no voxel is
        copied): spacing ``(W, H, N)`` mm, direction columns = the file's axes permuted and
        sign-flipped, origin = physical position of the first frame voxel."""
        d = np.array(image.GetDirection()).reshape(3, 3)
        sp = image.GetSpacing()
        first = [0, 0, 0]
        cols = []
        for m in range(3):
            a = self.perm[m]
            if self.flip[m]:
                first[a] = self.size[a] - 1
            cols.append(d[:, a] * (-1.0 if self.flip[m] else 1.0))
        return ArrayGeometry(image.TransformIndexToPhysicalPoint(first), [float(sp[self.perm[m]]) for m in range(3)],
                             np.stack(cols, axis=1), ArrayGeometry.of(image).centre)

    def to_original(self, frame_array: np.ndarray, reference: sitk.Image) -> sitk.Image:
        """``(N, H, W)`` frame array -> image on ``reference``'s exact grid (size, spacing,
        origin, direction copied). Raises ``ValueError`` if the shape does not fit."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.from_array(frame_array)))
        if img.GetSize() != tuple(reference.GetSize()):
            raise GeometryError(f"cannot map back onto the reference grid ({describe_geometry(reference)}).")
        img.CopyInformation(reference)
        return img

    def file_to_frame_slice(self, k: int) -> int:
        """File slice index (along :attr:`file_slice_axis`) -> frame slice index. ``IndexError``
        outside ``0..N-1``."""
        n = self.num_slices
        if not 0 <= k < n:
            raise IndexError(k)
        return n - 1 - k if self.flip[2] else k

    def frame_to_file_slice(self, s: int) -> int:
        """Inverse of :meth:`file_to_frame_slice`."""
        return self.file_to_frame_slice(s)

    def to_dict(self) -> dict:
        return {"axis": self.axis, "perm": list(self.perm), "flip": list(self.flip)}


def slice_frame(image: sitk.Image, axis: str = DEFAULT_AXIS) -> SliceFrame:
    """The exact slice frame of a 3D image for a slice-axis choice.

    ``acquisition``: slices along :func:`acquisition_axis` (the file's own stacking axis, through
    any oblique direction). The two in-plane axes get the distinct patient axes (L, P, S) they are
    closest to (maximum summed |cosine|); rows are the axis assigned the later of P/S, columns the
    other; each in-plane axis is flipped to point towards +L/+P/+S of its patient axis, and the
    slice axis towards the + side of its largest LPS component. For axis-aligned scans this is
    exactly the named frame of the acquisition plane (axial: rows P, columns L, slices S up).

    ``axial`` / ``coronal`` / ``sagittal``: the file axes are assigned to L, P, S (maximum summed
    |cosine|; the exact LPS reorientation :func:`to_canonical` for axis-aligned images) and the
    frame is the canonical ``(z, y, x)`` array with the slice axis moved first: axial
    ``(S, P, L)``, coronal ``(P, S, L)``, sagittal ``(L, S, P)``.

    Raises ``ValueError`` for an unknown choice or a non-3D image."""
    if axis not in AXIS_CHOICES:
        raise ValueError(f"unknown slice axis {axis!r}; use one of {', '.join(AXIS_CHOICES)}.")
    if image.GetDimension() != 3:
        raise ValueError("slice_frame expects a 3D image")
    d = np.array(image.GetDirection()).reshape(3, 3)
    size = image.GetSize()
    if axis == "acquisition":
        s = acquisition_axis(size, image.GetSpacing())
        a, b = [x for x in range(3) if x != s]
        assign = _best_assignment(d, (a, b))
        rows, cols = (a, b) if assign[a] > assign[b] else (b, a)
        r = ({0, 1, 2} - {assign[a], assign[b]}).pop()
        ds = d[:, s]
        big = int(np.argmax(np.abs(ds)))
        ref = r if abs(ds[r]) >= abs(ds[big]) - _SCORE_TOL else big
        perm = (cols, rows, s)
        flip = (d[assign[cols], cols] < 0, d[assign[rows], rows] < 0, ds[ref] < 0)
        return SliceFrame(axis, perm, flip, size)
    assign = _best_assignment(d, (0, 1, 2))
    file_of = {lps: f for f, lps in assign.items()}  # LPS axis -> file axis
    lps_perm = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}[axis]
    perm = tuple(file_of[p] for p in lps_perm)
    flip = tuple(d[p, file_of[p]] < 0 for p in lps_perm)
    return SliceFrame(axis, perm, flip, size)


def stacking_direction(image: sitk.Image) -> np.ndarray:
    """Unit LPS vector ``(3,)`` of the file's stacking axis (:func:`acquisition_axis`), signed so
    that its largest component is positive (the slice normal of the acquisition plane)."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    v = d[:, acquisition_axis(image.GetSize(), image.GetSpacing())]
    v = v / np.linalg.norm(v)
    return v if v[int(np.argmax(np.abs(v)))] > 0 else -v


def acquisition_plane(image: sitk.Image) -> str:
    """``axial`` / ``coronal`` / ``sagittal`` when the slice normal (:func:`stacking_direction`)
    is within 45 degrees of S / P / L, else ``oblique``."""
    v = np.abs(stacking_direction(image))
    k = int(np.argmax(v))
    if v[k] <= np.cos(np.radians(45.0)) + 1e-6:
        return "oblique"
    return ("sagittal", "coronal", "axial")[k]


def plane_angle_deg(u, v) -> float:
    """Angle in degrees (0..90) between two slice normals (sign ignored)."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    c = abs(float(u @ v)) / (np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.degrees(np.arccos(min(1.0, c))))


class ArrayGeometry:
    """Where the voxels of a numpy array lie in the patient: LPS mm from array indices.

    ``lps = origin + direction @ (spacing * (i, j, k))`` for the array element ``[k, j, i]``
    (numpy axes are ITK's reversed, as ``sitk.GetArrayViewFromImage`` gives them), plus the LPS
    position of the *scan's* centre (the centre of its whole voxel grid), which stays the scan's
    when the array is a run of its slices (:meth:`shifted`). Built from an image with :meth:`of`;
    a :class:`SliceFrame`'s frame array uses the frame image's geometry (:meth:`SliceFrame.frame_geometry`).
    """

    def __init__(self, origin, spacing, direction, centre):
        self.origin = np.asarray(origin, dtype=float).reshape(3)
        self.spacing = np.asarray(spacing, dtype=float).reshape(3)
        self.direction = np.asarray(direction, dtype=float).reshape(3, 3)
        self.centre = np.asarray(centre, dtype=float).reshape(3)

    @classmethod
    def of(cls, image: sitk.Image) -> ArrayGeometry:
        """The geometry of ``sitk.GetArrayViewFromImage(image)`` (3D image)."""
        size = np.array(image.GetSize(), dtype=float)
        centre = image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist())
        return cls(image.GetOrigin(), image.GetSpacing(), image.GetDirection(), centre)

    def shifted(self, numpy_axis: int, start: int) -> ArrayGeometry:
        """The geometry of ``array[start:]`` along ``numpy_axis`` (same scan centre)."""
        step = np.zeros(3)
        step[2 - numpy_axis] = start
        return ArrayGeometry(self.origin + self.direction @ (self.spacing * step), self.spacing, self.direction,
                             self.centre)

    def offsets_lps(self, index_zyx: np.ndarray) -> np.ndarray:
        """``(n, 3)`` numpy-order indices (floats allowed) -> ``(n, 3)`` LPS mm from the scan centre."""
        ijk = np.asarray(index_zyx, dtype=float).reshape(-1, 3)[:, ::-1]
        return self.origin + (ijk * self.spacing) @ self.direction.T - self.centre
