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

from .errors import GeometryError

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
