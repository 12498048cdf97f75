"""Cases (an image, its partial labels, the class map, which slices are labelled) and the
prepared 2D slice set that every training stage consumes.

Slices are taken in a canonical orientation (see :func:`TSKDLib.geometry.to_canonical`): the
volume is reoriented exactly to LPS, so its array is ``(z, y, x)`` = (inferior->superior,
right->left... in array index terms: z towards superior, y towards posterior, x towards left).
Axial slices are ``array[k]``, coronal ``array[:, j]``, sagittal ``array[:, :, i]``. The slice
axis is therefore chosen through the direction matrix, not the file's array order.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry
from .classmap import ClassMap
from .errors import InputError, LabelError
from .io import find_2d_pairs, read_image, read_label_file
from .preprocess import Normalization, SliceResizer

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One scan with optional partial labels.

    Attributes
    ----------
    name, subject:
        Display name and subject id (benchmarks split by subject, never by slice).
    image:
        3D float32 SimpleITK image on its original grid (intensities as stored, HU for CT).
    labels:
        3D uint8/uint16 image of *class indices* ``0..K`` on the image grid, or None.
    class_map:
        The task's classes.
    axis:
        ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    labelled:
        ``(N,)`` bool over canonical slices along ``axis``: which slices count as labelled.
        Unlabelled slices are ignored by every supervised loss (never treated as background).
    modality:
        DICOM modality if known ("CT", "MR", "US"), else None.
    """

    name: str
    subject: str
    image: sitk.Image
    labels: sitk.Image | None
    class_map: ClassMap
    axis: str = "axial"
    labelled: np.ndarray | None = None
    modality: str | None = None
    image_path: str | None = None
    labels_path: str | None = None
    _canonical: sitk.Image | None = field(default=None, repr=False)
    _canonical_labels: sitk.Image | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.axis not in geometry.SLICE_AXES:
            raise InputError(f"unknown slice axis {self.axis!r}; use axial, coronal or sagittal.")

    # -- canonical arrays ----------------------------------------------------------------------
    @property
    def canonical_image(self) -> sitk.Image:
        if self._canonical is None:
            self._canonical = geometry.to_canonical(self.image)
        return self._canonical

    @property
    def canonical_labels(self) -> sitk.Image | None:
        if self.labels is None:
            return None
        if self._canonical_labels is None:
            self._canonical_labels = geometry.to_canonical(self.labels)
        return self._canonical_labels

    @property
    def num_slices(self) -> int:
        return sitk.GetArrayViewFromImage(self.canonical_image).shape[geometry.SLICE_AXES[self.axis]]

    def image_slices(self) -> np.ndarray:
        """Raw intensities as ``(N, H, W)`` float32 slices along ``axis`` (canonical frame)."""
        arr = sitk.GetArrayViewFromImage(self.canonical_image)
        return np.ascontiguousarray(np.moveaxis(arr, geometry.SLICE_AXES[self.axis], 0))

    def label_slices(self) -> np.ndarray | None:
        """Class indices as ``(N, H, W)`` uint8/uint16 slices along ``axis``, or None."""
        if self.labels is None:
            return None
        arr = sitk.GetArrayViewFromImage(self.canonical_labels)
        return np.ascontiguousarray(np.moveaxis(arr, geometry.SLICE_AXES[self.axis], 0))

    def slice_spacing(self) -> tuple[float, float]:
        """Pixel spacing ``(row_mm, col_mm)`` of the slices returned by :meth:`image_slices`."""
        sx, sy, sz = self.canonical_image.GetSpacing()
        per_axis = [sz, sy, sx]  # numpy axis order (z, y, x)
        del per_axis[geometry.SLICE_AXES[self.axis]]
        return float(per_axis[0]), float(per_axis[1])

    def labelled_indices(self) -> list[int]:
        """Canonical indices of the labelled slices."""
        return [] if self.labelled is None else [int(i) for i in np.flatnonzero(self.labelled)]

    # -- back to the original grid ---------------------------------------------------------------
    def to_original(self, slices: np.ndarray) -> sitk.Image:
        """Put ``(N, H, W)`` per-slice label maps (canonical frame) back on the original grid.

        Returns a uint8 image with the image's exact size, spacing, origin and direction."""
        slices = np.asarray(slices)
        canon_shape = sitk.GetArrayViewFromImage(self.canonical_image).shape
        arr = np.moveaxis(slices, 0, geometry.SLICE_AXES[self.axis])
        if arr.shape != canon_shape:
            raise ValueError(f"slices of shape {slices.shape} do not fit the case ({canon_shape}).")
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr.astype(np.uint8 if arr.max(initial=0) < 256 else np.uint16)))
        img.CopyInformation(self.canonical_image)
        return geometry.from_canonical(img, self.image)

    def file_to_canonical_slice(self, k: int) -> int:
        """Convert a slice index as counted in the image file (voxel index along the file axis
        closest to ``axis``) into the canonical index used by :meth:`image_slices`."""
        direction = np.array(self.image.GetDirection()).reshape(3, 3)
        lps_axis = 2 - geometry.SLICE_AXES[self.axis]  # axial -> S (2), coronal -> P (1), sagittal -> L (0)
        file_axis = int(np.argmax(np.abs(direction[lps_axis])))
        n = self.image.GetSize()[file_axis]
        if not 0 <= k < n:
            raise LabelError(f"labelled slice {k} is outside the image (0..{n - 1}).", self.image_path,
                             "Give slice indices within the image.")
        return k if direction[lps_axis, file_axis] > 0 else n - 1 - k


def _labelled_from_values(label_values_canonical: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(a for a in range(3) if a != axis)
    return np.any(label_values_canonical != 0, axis=other)


def load_case(image: str | Path, labels: str | Path | None = None,
              class_map: ClassMap | str | Path | dict | None = None,
              classes: Sequence[str] | None = None, labelled_slices: Sequence[int] | None = None,
              axis: str = "axial", name: str | None = None, subject: str | None = None,
              spacing_2d: tuple[float, float] | None = None, mask_threshold: int | None = None,
              require_labels: bool = False) -> Case:
    """Read an image and its (partial) labels into a :class:`Case`.

    Parameters
    ----------
    image:
        Volume file, DICOM folder or 2D image (see :func:`TSKDLib.io.read_image`).
    labels:
        Label volume, ``.seg.nrrd`` or 2D mask; paired with the image through physical space
        (resampled with nearest neighbour, with a warning, if its grid differs).
    class_map:
        :class:`ClassMap`, a JSON path, or a ``{value: name}`` dict. Optional for ``.seg.nrrd``.
    classes:
        Names of the classes to learn (subset of the class map); other labelled structures
        become background.
    labelled_slices:
        Indices of labelled slices, counted along the file's voxel axis closest to ``axis``.
        Default: a slice is labelled when it holds any non-zero label value. Passing them lets
        an all-background slice count as labelled.
    axis:
        Slice axis (axial default), defined through the direction matrix.
    mask_threshold:
        For 2D masks saved as 0/255 images: values >= threshold are the (single) class.

    Raises
    ------
    InputError, GeometryError, LabelError
        Unreadable inputs, non-overlapping geometry, unknown label values, no labelled slice
        (when ``require_labels``).
    """
    image_path = str(image)
    img, info = read_image(image, spacing_2d=spacing_2d)
    if isinstance(class_map, (str, Path)):
        class_map = ClassMap.from_json(class_map)
    elif isinstance(class_map, dict):
        class_map = ClassMap.from_dict(class_map)
    lab_img = None
    labelled = None
    if labels is not None:
        raw, class_map = read_label_file(labels, class_map, binary_threshold=mask_threshold)
        if raw.GetSize()[2] == 1 and img.GetSize()[2] == 1 and raw.GetSize() == img.GetSize():
            raw.CopyInformation(img)  # 2D image/mask pairs carry no geometry: same pixel grid
        raw = geometry.pair_labels_with_image(img, raw, str(labels), image_path)
        class_map = class_map.select(classes) if classes else class_map
        values = sitk.GetArrayFromImage(raw)
        indices = class_map.to_indices(values, source=str(labels))
        lab_img = sitk.GetImageFromArray(indices)
        lab_img.CopyInformation(img)
        ax = geometry.SLICE_AXES[axis]
        labelled = _labelled_from_values(sitk.GetArrayFromImage(geometry.to_canonical(raw)), ax)
    elif class_map is None:
        if require_labels:
            raise LabelError("no labels given.", image_path, "Pass the label file with --labels.")
    case = Case(name or Path(image_path.rstrip("/")).name.split(".")[0], subject or "", img, lab_img,
                class_map, axis, labelled, info.modality, image_path,
                str(labels) if labels is not None else None)
    if not case.subject:
        case.subject = case.name
    if labelled_slices is not None:
        if lab_img is None:
            raise LabelError("labelled slices were given without labels.", image_path,
                             "Pass the label file too.")
        flags = np.zeros(case.num_slices, dtype=bool)
        for k in labelled_slices:
            flags[case.file_to_canonical_slice(int(k))] = True
        case.labelled = flags
    if require_labels and (case.labelled is None or not case.labelled.any()):
        raise LabelError("no labelled slice: the labels are empty.", labels or image_path,
                         "Label at least one slice, or list the labelled slices explicitly.")
    return case


def load_2d_cases(images_dir: str | Path, masks_dir: str | Path | None, class_map: ClassMap | str | Path | dict,
                  mask_suffix: str = "_Annotation", mask_threshold: int | None = 128,
                  subject_pattern: str = r"^(\d+)", names: Sequence[str] | None = None) -> list[Case]:
    """Load a folder of 2D images (and masks) as one-slice cases.

    Masks are paired by file name (``NAME.png`` <-> ``NAME{mask_suffix}.png``); images without a
    mask are unlabelled cases. ``mask_threshold`` binarises 0/255 masks (HC18: 128); pass None
    for masks that store label values. ``names`` restricts loading to those image stems."""
    pairs = find_2d_pairs(images_dir, masks_dir, mask_suffix, subject_pattern)
    if names is not None:
        wanted = set(names)
        pairs = [p for p in pairs if p.image.stem in wanted]
    cases = []
    for p in pairs:
        cases.append(load_case(p.image, p.mask, class_map, mask_threshold=mask_threshold,
                               name=p.image.stem, subject=p.subject))
    return cases


# ------------------------------------------------------------------------------------------------
# Prepared slices at model size
# ------------------------------------------------------------------------------------------------
@dataclass
class SliceSet:
    """All 2D slices of some cases at the model input size ``S``, ready for training.

    Attributes
    ----------
    images: ``(N, 1, S, S)`` float32 in ``[0, 1]`` (normalised, resized, zero-padded).
    labels: ``(N, S, S)`` int64 class indices ``0..K``; ``-1`` on every pixel of unlabelled slices.
    valid: ``(N, S, S)`` bool, False on padding.
    labelled: ``(N,)`` bool.
    case_index, slice_index: ``(N,)`` int64, which case and which canonical slice.
    """

    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    labelled: torch.Tensor
    case_index: torch.Tensor
    slice_index: torch.Tensor
    class_map: ClassMap
    case_names: list[str]
    subjects: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, index) -> "SliceSet":
        """Slices selected by a bool mask or an index tensor/list."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx, as_tuple=False).flatten()
        return SliceSet(self.images[idx], self.labels[idx], self.valid[idx], self.labelled[idx],
                        self.case_index[idx], self.slice_index[idx], self.class_map,
                        self.case_names, self.subjects)

    def labelled_subset(self) -> "SliceSet":
        return self.subset(self.labelled)

    def save(self, path: str | Path) -> None:
        """Atomic save as a torch file (tensors + class map)."""
        from .io import atomic_write
        payload = {k: getattr(self, k) for k in ("images", "labels", "valid", "labelled", "case_index", "slice_index")}
        payload.update(class_map=self.class_map.to_json_dict(), case_names=self.case_names, subjects=self.subjects)
        atomic_write(Path(path), lambda tmp: torch.save(payload, tmp), overwrite=True)

    @classmethod
    def load(cls, path: str | Path) -> "SliceSet":
        p = torch.load(path, map_location="cpu", weights_only=False)
        return cls(p["images"], p["labels"], p["valid"], p["labelled"], p["case_index"], p["slice_index"],
                   ClassMap.from_json_dict(p["class_map"]), p["case_names"], p["subjects"])


@dataclass
class PreparedCase:
    """How one case's slices were mapped to model space (to map predictions back)."""

    resizer: SliceResizer
    normalization: dict


def prepare_case_slices(case: Case, size: int = 256, normalization: Normalization | str | None = None,
                        slices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, SliceResizer, dict]:
    """Normalise and resize one case's slices to the model size.

    Returns ``(images (n,1,S,S) float32, labels (n,S,S) int64 or None, resizer, norm_dict)``;
    labels hold ``-1`` on unlabelled slices. ``slices`` selects canonical slice indices."""
    if isinstance(normalization, str):
        normalization = Normalization.preset(normalization)
    raw = case.image_slices()
    norm = normalization or Normalization.for_modality(case.modality, raw)
    fitted = norm.fit(raw)
    sel = np.arange(raw.shape[0]) if slices is None else np.asarray(slices, dtype=np.int64)
    resizer = SliceResizer.create(raw.shape[1:], size, case.slice_spacing())
    imgs = resizer.to_model(torch.from_numpy(fitted(raw[sel]))).unsqueeze(1).contiguous()
    labels = None
    lab = case.label_slices()
    if lab is not None:
        labels = resizer.to_model(torch.from_numpy(lab[sel].astype(np.int64)), mode="nearest")
        flags = case.labelled[sel] if case.labelled is not None else np.zeros(len(sel), bool)
        labels[~torch.from_numpy(flags)] = -1
    norm_dict = {**norm.to_dict(), "lo": fitted.lo, "hi": fitted.hi}
    return imgs, labels, resizer, norm_dict


def prepare_slices(cases: Sequence[Case], size: int = 256,
                   normalization: Normalization | str | None = None,
                   only_labelled: bool = False) -> SliceSet:
    """Build a :class:`SliceSet` from cases (labelled and unlabelled slices).

    All cases must share one class map (same names in the same order)."""
    if not cases:
        raise InputError("no case to prepare.")
    cmap = cases[0].class_map
    for c in cases[1:]:
        if c.class_map is not None and cmap is not None and c.class_map.names != cmap.names:
            raise LabelError(f"case {c.name} has classes {c.class_map.names}, others {cmap.names}.",
                             c.labels_path, "Use one class map for all scans of a task.")
    parts = {k: [] for k in ("images", "labels", "valid", "labelled", "case_index", "slice_index")}
    for ci, case in enumerate(cases):
        sel = case.labelled_indices() if only_labelled else None
        if sel is not None and not sel:
            continue
        imgs, labels, resizer, _ = prepare_case_slices(case, size, normalization, sel)
        n = imgs.shape[0]
        idx = torch.arange(case.num_slices) if sel is None else torch.as_tensor(sel)
        if labels is None:
            labels = torch.full((n, size, size), -1, dtype=torch.int64)
        parts["images"].append(imgs)
        parts["labels"].append(labels)
        parts["valid"].append(resizer.valid_mask().expand(n, size, size).clone())
        parts["labelled"].append((labels >= 0).flatten(1).any(1))
        parts["case_index"].append(torch.full((n,), ci, dtype=torch.int64))
        parts["slice_index"].append(idx.to(torch.int64))
    if not parts["images"]:
        raise LabelError("no labelled slice in any case.", fix="Label at least one slice.")
    return SliceSet(**{k: torch.cat(v) for k, v in parts.items()}, class_map=cmap,
                    case_names=[c.name for c in cases], subjects=[c.subject for c in cases])
