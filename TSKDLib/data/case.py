"""Cases (an image, its partial labels, the class map, which slices are labelled) and the
prepared 2D slice set that every training stage consumes.

Slices are taken in a *slice frame* (:func:`TSKDLib.data.geometry.slice_frame`): an exact permutation
and flip of the file's voxels (no interpolation) whose array is ``(N, H, W)`` = (slices, rows,
columns). With the default axis ``acquisition`` the slices are the file's own acquired slices
(the stacking voxel axis, even when oblique to the patient axes); with ``axial`` / ``coronal`` /
``sagittal`` they are perpendicular to the patient axis closest to S / P / L (canonical LPS frame,
``(S, P, L)``, ``(P, S, L)``, ``(L, S, P)``). The slice axis is chosen through the header
(direction matrix, spacing), never the array shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from TSKDLib.data import geometry
from TSKDLib.data.classmap import ClassMap
from TSKDLib.errors import InputError, LabelError
from TSKDLib.data.io import find_2d_pairs, read_image, read_label_file
from TSKDLib.data.preprocess import Normalization, SliceResizer
from TSKDLib.data.slices import labelled_mask

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
        ``"acquisition"`` (default: the file's own slices), ``"axial"``, ``"coronal"`` or
        ``"sagittal"`` (see :func:`TSKDLib.data.geometry.slice_frame`).
    labelled:
        ``(N,)`` bool over frame slices along ``axis``: which slices count as labelled.
        Unlabelled slices are ignored by every supervised loss (never treated as background).
    modality:
        DICOM modality if known ("CT", "MR", "US"), else None.
    """

    name: str
    subject: str
    image: sitk.Image
    labels: sitk.Image | None
    class_map: ClassMap
    axis: str = geometry.DEFAULT_AXIS
    labelled: np.ndarray | None = None
    modality: str | None = None
    image_path: str | None = None
    labels_path: str | None = None
    _canonical: sitk.Image | None = field(default=None, repr=False)
    _canonical_labels: sitk.Image | None = field(default=None, repr=False)
    _frame: geometry.SliceFrame | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.axis not in geometry.AXIS_CHOICES:
            raise InputError(f"unknown slice axis {self.axis!r}; use {', '.join(geometry.AXIS_CHOICES)}.")

    # -- slice frame ---------------------------------------------------------------------------
    @property
    def frame(self) -> geometry.SliceFrame:
        """The exact slice frame of :attr:`image` for :attr:`axis`."""
        if self._frame is None:
            self._frame = geometry.slice_frame(self.image, self.axis)
        return self._frame

    @property
    def canonical_image(self) -> sitk.Image:
        """The image in its slice frame: array ``(N, H, W)``, spacing ``(W, H, N)`` mm, same
        physical voxel positions (LPS) as :attr:`image`."""
        if self._canonical is None:
            self._canonical = self.frame.frame_image(self.image)
        return self._canonical

    @property
    def canonical_labels(self) -> sitk.Image | None:
        if self.labels is None:
            return None
        if self._canonical_labels is None:
            self._canonical_labels = self.frame.frame_image(self.labels)
        return self._canonical_labels

    @property
    def num_slices(self) -> int:
        return self.frame.num_slices

    def image_slices(self) -> np.ndarray:
        """Raw intensities as ``(N, H, W)`` slices along ``axis`` (slice frame), read-only. The
        array keeps its image alive, so it stays valid after the case is gone."""
        return _array_view(self.canonical_image)

    def label_slices(self) -> np.ndarray | None:
        """Class indices as ``(N, H, W)`` uint8/uint16 slices along ``axis`` (read-only, valid
        after the case is gone), or None."""
        if self.labels is None:
            return None
        return _array_view(self.canonical_labels)

    def slice_spacing(self) -> tuple[float, float]:
        """Pixel spacing ``(row_mm, col_mm)`` of the slices returned by :meth:`image_slices`."""
        sx, sy, _ = self.canonical_image.GetSpacing()
        return float(sy), float(sx)

    def labelled_indices(self) -> list[int]:
        """Frame indices of the labelled slices."""
        return [] if self.labelled is None else [int(i) for i in np.flatnonzero(self.labelled)]

    def axis_info(self) -> dict:
        """JSON-able description of the slicing: axis choice, sliced file axis (``i``/``j``/``k``),
        the scan's acquisition plane and slice normal (LPS unit vector), slice count."""
        return {"axis": self.axis, "file_slice_axis": "ijk"[self.frame.file_slice_axis],
                "acquisition_plane": geometry.acquisition_plane(self.image),
                "slice_normal": [round(float(v), 6) for v in geometry.stacking_direction(self.image)],
                "labelled_file_slices": self.labelled_file_indices()}

    def labelled_file_indices(self) -> list[int]:
        """The labelled slices as the file's own slice indices (along the file axis
        :attr:`TSKDLib.data.geometry.SliceFrame.file_slice_axis`), sorted."""
        return sorted(self.frame.frame_to_file_slice(i) for i in self.labelled_indices())

    # -- back to the original grid ---------------------------------------------------------------
    def to_original(self, slices: np.ndarray) -> sitk.Image:
        """Put ``(N, H, W)`` per-slice label maps (slice frame) back on the original grid, voxel
        for voxel. Returns a uint8 (uint16 for values >= 256) image with the image's exact size,
        spacing, origin and direction. ``ValueError`` if the shape does not fit."""
        slices = np.asarray(slices)
        arr = slices.astype(np.uint8 if slices.max(initial=0) < 256 else np.uint16)
        return self.frame.to_original(arr, self.image)

    def file_to_canonical_slice(self, k: int) -> int:
        """Convert a slice index as counted in the image file (voxel index along the file axis
        that is sliced, :attr:`TSKDLib.data.geometry.SliceFrame.file_slice_axis`) into the frame index
        used by :meth:`image_slices`. Raises :class:`LabelError` outside ``0..N-1``."""
        n = self.num_slices
        if not 0 <= k < n:
            ijk = "ijk"[self.frame.file_slice_axis]
            raise LabelError(f"labelled slice {k} is outside the image: it has {n} {self.axis} slices "
                             f"(0..{n - 1}, file axis {ijk}).", self.image_path,
                             "Give the file's own slice indices along the slice axis (see tskd inspect).")
        return self.frame.file_to_frame_slice(k)


def _labelled_from_values(label_values_frame: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` label values -> ``(N,)`` bool: slices holding any non-zero value (the one
    rule, :func:`TSKDLib.data.slices.labelled_mask`)."""
    return labelled_mask(label_values_frame, axis=0)


def load_case(image: str | Path, labels: str | Path | None = None,
              class_map: ClassMap | str | Path | dict | None = None,
              classes: Sequence[str] | None = None, labelled_slices: Sequence[int] | None = None,
              axis: str = geometry.DEFAULT_AXIS, name: str | None = None, subject: str | None = None,
              spacing_2d: tuple[float, float] | None = None, mask_threshold: int | None = None,
              require_labels: bool = False) -> Case:
    """Read an image and its (partial) labels into a :class:`Case`.

    Parameters
    ----------
    image:
        Volume file, DICOM folder or 2D image (see :func:`TSKDLib.data.io.read_image`).
    labels:
        Label volume, ``.seg.nrrd`` or 2D mask; paired with the image through physical space
        (resampled with nearest neighbour, with a warning, if its grid differs).
    class_map:
        :class:`ClassMap`, a JSON path, or a ``{value: name}`` dict. Optional for ``.seg.nrrd``.
    classes:
        Names of the classes to learn (subset of the class map); other labelled structures
        become background.
    labelled_slices:
        Indices of labelled slices: the file's own slice indices along the sliced voxel axis
        (for ``acquisition``, the file's stacking axis; for a named axis, the file axis closest to
        it). Default: a slice is labelled when it holds any non-zero label value. Passing them
        lets an all-background slice count as labelled.
    axis:
        ``acquisition`` (default), ``axial``, ``coronal`` or ``sagittal``
        (:func:`TSKDLib.data.geometry.slice_frame`).
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
        if axis not in geometry.AXIS_CHOICES:
            raise InputError(f"unknown slice axis {axis!r}; use {', '.join(geometry.AXIS_CHOICES)}.")
        frame = geometry.slice_frame(img, axis)
        labelled = _labelled_from_values(frame.to_array(sitk.GetArrayViewFromImage(raw)))
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


class _ImageBuffer:
    """Exposes a SimpleITK image's voxel buffer to NumPy while holding the image: an array made
    from it (its ``base``) keeps the image alive. ``sitk.GetArrayViewFromImage`` alone does not,
    so its view read freed memory once the image was collected (seen: ``load_case(...).label_slices()``
    returned other data after a garbage collection)."""

    def __init__(self, image: sitk.Image):
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def _array_view(image: sitk.Image) -> np.ndarray:
    """Read-only ``(k, j, i)`` array of ``image``'s voxels without a copy, valid as long as the
    array lives (it references the image)."""
    arr = np.asarray(_ImageBuffer(image))
    arr.flags.writeable = False
    return arr


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
    intensity: the :class:`~TSKDLib.data.preprocess.Normalization` kind of every scan in the set,
        ``"window"`` (CT, HU window) or ``"percentile"`` (MR, ultrasound); None when unknown or
        mixed. The distillation's MR intensity augmentation follows it
        (:attr:`TSKDLib.distillation.distill.DistillConfig.mr_augment`).
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
    intensity: str | None = None

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
                        self.case_names, self.subjects, self.intensity)

    def labelled_subset(self) -> "SliceSet":
        """The labelled slices only."""
        return self.subset(self.labelled)

    def with_labelled(self, keep) -> "SliceSet":
        """A copy in which only slices ``keep`` (indices into this set) stay labelled; every other
        slice's labels become -1 (unlabelled). Benchmarks and tests hide reference labels this way."""
        s = self.subset(torch.arange(len(self)))
        flags = torch.zeros(len(s), dtype=torch.bool)
        flags[list(keep)] = True
        s.labels = s.labels.clone()
        s.labels[~flags] = -1
        s.labelled = flags
        return s

    def with_intensity_factors(self, factors) -> SliceSet:
        """A copy whose images of scan ``i`` (:attr:`case_index`) are multiplied by ``factors[i]``
        and clipped to ``[0, 1]`` (the same as fitting that scan's normalisation with ``hi``
        moved to ``lo + (hi - lo) / factor``; padding stays 0). The training side of the intensity
        standardisation (:func:`TSKDLib.deploy.inference.training_intensity_factors`). Returns
        ``self`` when every factor is 1. Raises ValueError when ``factors`` does not have one
        entry per scan."""
        if len(factors) != len(self.case_names):
            raise ValueError(f"{len(factors)} intensity factors for {len(self.case_names)} scans.")
        if all(float(f) == 1.0 for f in factors):
            return self
        scale = torch.as_tensor([float(f) for f in factors], dtype=torch.float32)[self.case_index]
        s = self.subset(torch.arange(len(self)))
        s.images = (self.images.float() * scale[:, None, None, None]).clamp(0, 1).to(self.images.dtype)
        return s

    def save(self, path: str | Path) -> None:
        """Atomic save as a torch file (tensors + class map)."""
        from TSKDLib.data.io import atomic_write
        payload = {k: getattr(self, k) for k in ("images", "labels", "valid", "labelled", "case_index", "slice_index")}
        payload.update(class_map=self.class_map.to_json_dict(), case_names=self.case_names, subjects=self.subjects,
                       intensity=self.intensity)
        atomic_write(Path(path), lambda tmp: torch.save(payload, tmp), overwrite=True)

    @classmethod
    def load(cls, path: str | Path) -> "SliceSet":
        p = torch.load(path, map_location="cpu", weights_only=False)
        return cls(p["images"], p["labels"], p["valid"], p["labelled"], p["case_index"], p["slice_index"],
                   ClassMap.from_json_dict(p["class_map"]), p["case_names"], p["subjects"], p.get("intensity"))


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


def with_labelled(case: Case, flags: np.ndarray) -> Case:
    """A shallow copy of ``case`` whose labelled slices are ``flags``, ``(N,)`` bool over the
    case's slices in slice-frame order (benchmarks choose which slices count as labelled)."""
    import copy

    c = copy.copy(case)
    c.labelled = flags
    return c


def predict_case(predict_proba, case: Case, size: int, normalization: Normalization | None = None) -> np.ndarray:
    """Label slices ``(N, H, W)`` uint8 at native resolution (slice-frame order) from a model
    ``(b, 1, S, S) -> (b, K+1, S, S)`` class probabilities at model size ``S = size``
    (argmax after :meth:`SliceResizer.from_model`, bilinear; batches of 8). ``normalization``:
    as :func:`prepare_case_slices` (default: the case's modality's)."""
    images, _, resizer, _ = prepare_case_slices(case, size, normalization)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 8):
            probs = predict_proba(images[i:i + 8]).float()
            out.append(resizer.from_model(probs, "bilinear").argmax(1).to(torch.uint8))
    return torch.cat(out).numpy()


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
    kinds = set()
    for ci, case in enumerate(cases):
        sel = case.labelled_indices() if only_labelled else None
        if sel is not None and not sel:
            continue
        imgs, labels, resizer, norm = prepare_case_slices(case, size, normalization, sel)
        kinds.add(norm["kind"])
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
                    case_names=[c.name for c in cases], subjects=[c.subject for c in cases],
                    intensity=kinds.pop() if len(kinds) == 1 else None)


def normalization_kind(cases: Sequence[Case], normalization: Normalization | str | None = None) -> str | None:
    """The :class:`~TSKDLib.data.preprocess.Normalization` kind :func:`prepare_slices` gives
    ``cases``, without preparing them (for a :class:`SliceSet` saved before it recorded
    ``intensity``): ``"window"`` (CT) or ``"percentile"`` (MR, ultrasound); None when they differ."""
    if isinstance(normalization, str):
        normalization = Normalization.preset(normalization)
    kinds = {(normalization or Normalization.for_modality(c.modality, c.image_slices())).kind for c in cases}
    return kinds.pop() if len(kinds) == 1 else None


#: A labelled slice whose class area is under this fraction of its area on the nearest labelled
#: slices on both sides, each at least :data:`DIP_MIN_AREA_MM2`, is a likely labelling slip
#: (:func:`labelled_slice_dips`; the rule of ``benchmarks/reference_defects.py --find``).
DIP_RATIO = 0.2
DIP_MIN_AREA_MM2 = 500.0


def labelled_slice_dips(case: Case, ratio: float = DIP_RATIO, min_area_mm2: float = DIP_MIN_AREA_MM2) -> list[str]:
    """Warnings for labelled slices where a class is missing, or nearly, inside its own labelled
    extent: its area on the slice is under ``ratio`` of its area on the nearest labelled slices
    before and after it (slice indices of ``case``'s frame; past labelled slices identical to it,
    so a slip copied onto the next slice is found too), each at least ``min_area_mm2`` (mm^2,
    from the in-plane spacing). The model learns such a slice as "no organ here": on CHAOS MR
    scan 31 a spleen labelled with 36 pixels on slice 17 between 1918 and 2620 pixels cost the
    spleen's Dice 0.05-0.10 (benchmarks/RESULTS.md, section 6, eighth and sixteenth passes).
    Slices are named by the file's own indices; an empty list for a 2D image or a case without
    labels."""
    lab = case.label_slices()
    idx = case.labelled_indices()
    if lab is None or len(idx) < 3:
        return []
    names = case.class_map.names
    # (labelled slice, class) areas in mm^2, one pass per slice
    area = np.stack([np.bincount(lab[i].ravel(), minlength=len(names) + 1)[:len(names) + 1] for i in idx])
    area = area * float(np.prod(case.slice_spacing()))
    neighbours = []  # (j, lo, hi): each inner labelled slice and its nearest labelled slices that differ
    for j in range(1, len(idx) - 1):
        lo, hi = j - 1, j + 1
        while lo > 0 and np.array_equal(lab[idx[lo]], lab[idx[j]]):
            lo -= 1
        while hi < len(idx) - 1 and np.array_equal(lab[idx[hi]], lab[idx[j]]):
            hi += 1
        neighbours.append((j, lo, hi))
    out = []
    for k, name in enumerate(names, start=1):
        for j, lo, hi in neighbours:
            before, after = area[lo, k], area[hi, k]
            if min(before, after) >= min_area_mm2 and area[j, k] < ratio * min(before, after):
                s, a, b = (case.frame.frame_to_file_slice(idx[i]) for i in (j, lo, hi))
                out.append(f"{case.name}: class '{name}' covers {area[j, k]:.0f} mm^2 on labelled slice {s}, against "
                           f"{before:.0f} and {after:.0f} mm^2 on labelled slices {a} and {b}: if the organ is "
                           "there, label it (the model learns each labelled slice as drawn); if it is truly "
                           "absent, ignore this.")
    return out


def check_label_coverage(cases: Sequence[Case]) -> list[str]:
    """Check, before any training, that every class is drawn on the labelled slices.

    For each class of the (shared) class map, counts the labelled slices (over all labelled
    cases) holding at least one voxel of it.

    Returns
    -------
    list of str
        Warnings: one per class present on a single labelled slice only, then one per labelled
        slice where a class all but vanishes inside its labelled extent
        (:func:`labelled_slice_dips`).

    Raises
    ------
    LabelError
        A class (or every class) has no labelled voxel on the labelled slices; the message names
        the class(es), the scan(s) and their labelled slices as the file's own indices along the
        slice axis, so a wrong ``--labelled-slices`` or ``--axis`` is visible at once.
    """
    labelled_cases = [c for c in cases if c.labels is not None and c.labelled is not None and c.labelled.any()]
    if not labelled_cases:
        return []
    names = labelled_cases[0].class_map.names
    counts = {name: 0 for name in names}
    for c in labelled_cases:
        lab = c.label_slices()
        for s in c.labelled_indices():
            present = np.unique(lab[s])
            for k, name in enumerate(names, start=1):
                if k in present:
                    counts[name] += 1
    missing = [n for n, v in counts.items() if v == 0]
    if missing:
        where = "; ".join(f"{Path(str(c.image_path or c.name)).name}: {c.axis} slices "
                          f"{_fmt_indices(c.labelled_file_indices())} (file axis "
                          f"{'ijk'[c.frame.file_slice_axis]}, {c.num_slices} slices)" for c in labelled_cases)
        what = ("no class has a labelled voxel" if len(missing) == len(names) else
                f"class{'es' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
                f"{'have' if len(missing) > 1 else 'has'} no labelled voxel")
        raise LabelError(f"{what} on the labelled slices ({where}).",
                         labelled_cases[0].labels_path,
                         "Check --labelled-slices (the file's own slice indices along the slice axis, "
                         "see tskd inspect) and --axis, label those classes on the labelled slices, "
                         "or drop them with --classes.")
    return ([f"class '{n}' is labelled on a single slice only: the model sees one example of it."
             for n, v in counts.items() if v == 1]
            + [w for c in labelled_cases for w in labelled_slice_dips(c)])


def _fmt_indices(idx: Sequence[int]) -> str:
    idx = list(idx)
    return ",".join(str(i) for i in idx[:20]) + (",..." if len(idx) > 20 else "")
