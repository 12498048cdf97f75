"""In-process interactive segmentation: the logic of the Segment Editor effect "TSKD", plain Python.

Nothing here imports Slicer or Qt: numpy, SimpleITK and the torch-free ``TSKDLib.deploy.inference``
(onnxruntime) only, so every rule is tested without the application. The MRML side (reading the
volume node, writing segments) is :mod:`TSKDSlicerLib.inprocess`.

Arrays and coordinates
----------------------
* A volume array is ``(K, J, I)`` (``slicer.util.arrayFromVolume`` order: slice k, row j, column i).
* ``ijk_to_ras`` is the volume node's own 4x4 IJK-to-RAS matrix (mm, RAS, columns i, j, k and
  the origin). A parent transform is *not* applied to the voxels: like ``tskd segment`` on the
  file ``logic.segment`` writes (the node's own grid), the model sees the volume's voxel grid, and
  the labels are written back on that grid through whatever transform lies between the volume
  and the segmentation (:func:`TSKDSlicerLib.mrml_io.volume_grid_in`).
* "Slice ``s``" is index ``s`` along the numpy axis of the model's slice axis
  (:attr:`SlicePredictor.axis`): the rule of ``tskd segment`` (``TSKDLib.data.geometry.slice_frame``,
  the acquisition axis by default). A 2D slice mask is ``np.take(volume, s, axis)``'s shape.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


class InteractiveError(RuntimeError):
    """Refused input (model, volume, segments); the message names the thing and the fix."""


class Cancelled(RuntimeError):
    """The user pressed Cancel; nothing after the last finished chunk was written.

    ``kept``: False when the operation stopped before writing anything (a whole-volume run with
    3D clean-up predicts every slice before it writes), True when finished chunks were kept."""

    def __init__(self, message: str = "cancelled", kept: bool = True):
        super().__init__(message)
        self.kept = kept


def ensure_backend_importable(module_dir: str | None = None) -> None:
    """Put the folder holding ``TSKDLib`` on ``sys.path`` (the packaged copy next to
    ``TSKDSlicer.py``, or the repository root one level above the module folder), the same
    rule as the backend processes' ``PYTHONPATH`` (:func:`TSKDSlicerLib.jobs.backend_pythonpath`)."""
    from . import jobs

    for path in jobs.backend_pythonpath(module_dir):
        if path not in sys.path:
            sys.path.append(path)


# ------------------------------------------------------------------------------------------------
# Model sessions
# ------------------------------------------------------------------------------------------------
def _model_key(model_dir: str) -> tuple:
    """``(real path, mtime_ns of model.onnx, mtime_ns of model_card.json)``; a missing file gives -1."""
    path = os.path.realpath(str(model_dir))
    stamps = []
    for name in ("model.onnx", "model_card.json"):
        try:
            stamps.append(os.stat(os.path.join(path, name)).st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return (path, *stamps)


class ModelSessionCache:
    """One onnxruntime session per model package, loaded and checksum-verified once.

    The key is the package's real path plus the modification times of ``model.onnx`` and
    ``model_card.json``: a package replaced on disk (a new quick-update version copied over, an
    import) is loaded and verified again; otherwise :meth:`get` returns the open session at once.

    ``library``: an optional :class:`TSKDSlicerLib.models.ModelLibrary`; a package of that library
    that fails to load (checksum mismatch, missing file, unloadable ONNX) is marked broken there
    (:meth:`ModelLibrary.mark_broken`) and refused. ``threads``: onnxruntime CPU threads
    (None: its default).
    """

    def __init__(self, library=None, threads: int | None = None, providers: Sequence[str] | None = None):
        self.library = library
        self.threads = threads
        self.providers = list(providers) if providers else None
        self._sessions: dict[tuple, object] = {}
        self.loads = 0  # number of real loads (checksum + session creation), for tests

    def get(self, model_dir: str):
        """The :class:`TSKDLib.deploy.inference.ModelPackage` of ``model_dir`` (cached).

        Raises :class:`InteractiveError` naming the package and the fix when it does not load;
        a library package is then marked broken."""
        from TSKDLib.errors import ModelPackageError
        from TSKDLib.deploy.inference import load_model_package

        key = _model_key(model_dir)
        pkg = self._sessions.get(key)
        if pkg is not None:
            return pkg
        if self.library is not None and self.library.is_broken(model_dir):
            raise InteractiveError(f"{model_dir}: this model package is marked broken "
                                   f"({self.library.broken_reason(model_dir)}). Import or train it again.")
        try:
            pkg = load_model_package(model_dir, providers=self.providers, threads=self.threads, verify=True)
        except ModelPackageError as exc:
            if self.library is not None and self.library.contains(model_dir):
                self.library.mark_broken(model_dir, str(exc))
            raise InteractiveError(f"Refused: {exc}") from None
        for old in [k for k in self._sessions if k[0] == key[0]]:
            del self._sessions[old]  # an older version of the same folder
        self._sessions[key] = pkg
        self.loads += 1
        return pkg

    def clear(self) -> None:
        self._sessions.clear()


# ------------------------------------------------------------------------------------------------
# Geometry and modality
# ------------------------------------------------------------------------------------------------
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def sitk_geometry(shape_kji: Sequence[int], ijk_to_ras) -> "object":
    """An empty ``SimpleITK.Image`` (uint8) with the volume's size, spacing, origin and direction
    (LPS), for the backend's geometry functions. ``shape_kji``: ``(K, J, I)``; ``ijk_to_ras``: 4x4.
    Raises :class:`InteractiveError` for a singular matrix."""
    import SimpleITK as sitk

    m = np.asarray(ijk_to_ras, dtype=float)
    cols = m[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 0):
        raise InteractiveError("The volume's IJK-to-RAS matrix has a zero column; fix the volume's spacing.")
    direction = _RAS_TO_LPS @ (cols / spacing)
    origin = _RAS_TO_LPS @ m[:3, 3]
    k, j, i = (int(n) for n in shape_kji)
    img = sitk.Image([i, j, k], sitk.sitkUInt8)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction.ravel()])
    return img


def modality_warning(card: Mapping, array: np.ndarray, volume_name: str = "the volume",
                     dicom_modality: str | None = None) -> str | None:
    """A warning when the volume looks like another modality than the model was trained on, else None.

    The model's modality comes from its card's normalisation (``window``: CT in HU; ``percentile``:
    MR, ultrasound or other); the volume's from its DICOM modality when known, else from its
    intensities (CT has air near -1000 HU: minimum <= -500)."""
    norm = (card.get("normalization") or {}).get("kind")
    if norm not in ("window", "percentile"):
        return None
    model_ct = norm == "window"
    if dicom_modality:
        vol_ct = dicom_modality.upper() == "CT"
        vol_desc = f"{dicom_modality.upper()} (DICOM modality)"
    else:
        lo = float(np.min(array)) if np.asarray(array).size else 0.0
        vol_ct = lo <= -500.0
        vol_desc = ("CT (air at %.0f HU)" % lo) if vol_ct else f"not CT (minimum intensity {lo:g}: no air at -1000 HU)"
    if vol_ct == model_ct:
        return None
    model_desc = "CT (HU window)" if model_ct else "MR/ultrasound (percentile normalisation)"
    name = card.get("name") or "the model"
    return (f"{name!r} was trained on {model_desc}, but {volume_name!r} looks {vol_desc}: the "
            f"predictions may be wrong. Use a model trained on this modality.")


# ------------------------------------------------------------------------------------------------
# Prediction of slices
# ------------------------------------------------------------------------------------------------
class SlicePredictor:
    """Segments slices of one volume with one model package, exactly as ``tskd segment`` does.

    Parameters
    ----------
    package:
        A :class:`TSKDLib.deploy.inference.ModelPackage` (from :class:`ModelSessionCache`).
    array:
        The volume ``(K, J, I)`` in its stored units (HU for CT); not copied, not modified.
    ijk_to_ras:
        The volume node's own 4x4 IJK-to-RAS (mm, RAS).

    The slice frame (``TSKDLib.data.geometry.slice_frame`` of the model's slice axis), the acquisition
    plane check, the intensity normalisation (fitted on the whole volume, once) and the resize
    are those of :func:`TSKDLib.deploy.inference.segment_image`; per slice the labels are bit-identical
    to ``tskd segment`` on the whole volume at that slice (without 3D clean-up).

    Raises :class:`InteractiveError` when the model refuses the volume (another acquisition
    plane) or the volume is not 3D scalar.
    """

    def __init__(self, package, array: np.ndarray, ijk_to_ras, source: str | None = None):
        from TSKDLib.data import geometry
        from TSKDLib.errors import InputError
        from TSKDLib.deploy.inference import NumpyResizer, check_acquisition_plane, fit_normalization

        array = np.asarray(array)
        if array.ndim != 3:
            raise InteractiveError(f"{source or 'The volume'} has {array.ndim} array dimensions; a scalar "
                                   "volume (K, J, I) is needed (convert RGB or 4D data to a scalar volume).")
        self.package = package
        self.array = array
        self.image = sitk_geometry(array.shape, ijk_to_ras)
        try:
            check_acquisition_plane(package, self.image, source)
        except InputError as exc:
            raise InteractiveError(str(exc)) from None
        self.frame = geometry.slice_frame(self.image, package.slice_axis)
        #: numpy axis (0 = k, 1 = j, 2 = i) of the volume array along which slices are taken
        self.axis = 2 - self.frame.file_slice_axis
        self.num_slices = self.frame.num_slices
        sp = self.image.GetSpacing()
        fsx, fsy = float(sp[self.frame.perm[0]]), float(sp[self.frame.perm[1]])
        self._frame_view = self.frame.to_array(array)  # (N, H, W) view
        self.lo, self.hi = fit_normalization(package.normalization, self._frame_view)
        self.resizer = NumpyResizer.create(self._frame_view.shape[1:], package.input_size, (fsy, fsx))
        self._pixel_mm2 = fsy * fsx  # native in-plane pixel area
        self._voxel_mm3 = self._pixel_mm2 * float(sp[self.frame.perm[2]])
        #: the intensity standardisation's factor (1.0: none), found on the first prediction
        self.intensity_factor: float | None = None

    # -- index and orientation mapping -----------------------------------------------------------
    def _frame_slice(self, index: int) -> int:
        if not 0 <= int(index) < self.num_slices:
            raise InteractiveError(f"Slice {index} is outside the volume (0..{self.num_slices - 1}).")
        return self.frame.file_to_frame_slice(int(index))

    def _to_volume_slice(self, frame2d: np.ndarray) -> np.ndarray:
        """A frame slice ``(H, W)`` -> the volume slice ``np.take(array, s, axis)`` orientation."""
        f = frame2d
        if self.frame.flip[1]:
            f = f[::-1]
        if self.frame.flip[0]:
            f = f[:, ::-1]
        row_np, col_np = 2 - self.frame.perm[1], 2 - self.frame.perm[0]
        if row_np > col_np:
            f = f.T
        return np.ascontiguousarray(f)

    # -- inference ---------------------------------------------------------------------------------
    def _standardize(self) -> None:
        """Once per volume, for models with an intensity reference: predict every slice, and
        scale the normalisation as ``tskd segment`` does when the classes come out darker or
        brighter than in the training scans (:func:`TSKDLib.deploy.inference.standardized_range`),
        so that any slice's labels stay those of ``tskd segment`` on the whole volume."""
        from TSKDLib.deploy.inference import predict_slices, standardized_range

        self.intensity_factor = 1.0
        if not self.package.intensity_reference or self.num_slices < 2:
            return
        frame_labels, _ = predict_slices(self.package, self._frame_view, self.resizer, self.lo, self.hi, 8,
                                         self._pixel_mm2, False, None, "")  # tskd segment's first pass
        _, self.hi, self.intensity_factor = standardized_range(self.package, self._frame_view, self.lo, self.hi,
                                                              frame_labels, self._voxel_mm3)

    def _inputs(self, indices: Sequence[int]) -> np.ndarray:
        from TSKDLib.deploy.inference import apply_normalization

        if self.intensity_factor is None:
            self._standardize()
        raw = np.stack([self._frame_view[self._frame_slice(s)] for s in indices])
        return self.resizer.to_model(apply_normalization(raw, self.lo, self.hi))[:, None]

    def logits(self, indices: Sequence[int]) -> np.ndarray:
        """``(n, K+1, S, S)`` float32 model logits of slices ``indices`` (model grid, padded)."""
        return self.package.predict_logits(self._inputs(indices))

    def predict(self, indices: Sequence[int], batch_size: int = 8,
                progress: Callable[[int, int], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> dict[int, np.ndarray]:
        """Labels ``{s: (rows, cols) uint8 class indices 0..K}`` of slices ``indices``, in the
        volume slice orientation (``np.take(array, s, axis)``). Runs in chunks of ``batch_size``;
        ``progress(done, total)`` after each; raises :class:`Cancelled` when ``cancelled()``."""
        indices = [int(s) for s in indices]
        out: dict[int, np.ndarray] = {}
        starts = list(range(0, len(indices), max(1, batch_size)))
        if not starts:
            return out
        # onnxruntime runs chunk i in a worker thread (it releases the GIL) while this thread
        # prepares chunk i+1 and maps chunk i-1 back: the pipeline of tskd segment, same labels.
        from concurrent.futures import ThreadPoolExecutor

        def chunk(i):
            return indices[starts[i]:starts[i] + batch_size]

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.package.predict_logits, self._inputs(chunk(0)))
            for i in range(len(starts)):
                logits = pending.result()
                if cancelled is not None and cancelled():
                    raise Cancelled("cancelled")
                if i + 1 < len(starts):
                    pending = pool.submit(self.package.predict_logits, self._inputs(chunk(i + 1)))
                labels = self.resizer.labels_from_logits(logits)
                for s, lab in zip(chunk(i), labels):
                    out[s] = self._to_volume_slice(lab)
                if progress is not None:
                    progress(min(starts[i] + batch_size, len(indices)), len(indices))
        return out

    def uncertainty(self, indices: Sequence[int], batch_size: int = 8) -> dict[int, float]:
        """``{s: mm^2}``: per slice, the area the model expects to have wrong (sum of ``1 - max
        softmax`` over the slice's model pixels, padding excluded, times a model pixel's native
        area; :func:`TSKDLib.deploy.inference.uncertain_area_mm2`). The same number ``tskd
        segment`` ranks its slices to check by (``SliceReview.uncertain_mm2``), so "Label next"
        and the command line point at the same slices."""
        from TSKDLib.deploy.inference import uncertain_area_mm2

        out = {}
        indices = [int(s) for s in indices]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            for s, area in zip(chunk, uncertain_area_mm2(self.logits(chunk), self.resizer, self._pixel_mm2)):
                out[s] = float(area)
        return out


# ------------------------------------------------------------------------------------------------
# Segment <-> class matching and the editor's masking rules
# ------------------------------------------------------------------------------------------------
def match_segments(class_names: Sequence[str], segment_names: Mapping[str, str],
                   selected: Sequence[str] | None, model_name: str = "the model",
                   segmentation_name: str = "the segmentation") -> dict[str, int]:
    """``{segmentId: class index 1..K}`` for the segments to write.

    ``segment_names``: ``{segmentId: name}`` of the segmentation; ``selected``: the segment ids to
    write (None: every segment whose name is a model class). Names match case-insensitively.
    Raises :class:`InteractiveError` (nothing is written) when a selected segment is not a class
    of the model, or when no segment matches; the message lists both name sets and the fix."""
    lower = {n.strip().lower(): k for k, n in enumerate(class_names, start=1)}
    ids = list(selected) if selected is not None else list(segment_names)
    out, missing = {}, []
    for sid in ids:
        name = segment_names.get(sid)
        if name is None:
            raise InteractiveError(f"Segment {sid!r} is not in {segmentation_name!r}.")
        k = lower.get(name.strip().lower())
        if k is None:
            missing.append(name)
        else:
            out[sid] = k
    if (selected is not None and missing) or not out:
        shown = missing or list(segment_names.values())
        raise InteractiveError(
            f"{model_name!r} segments {list(class_names)}, but {segmentation_name!r} "
            f"{'has the selected segment(s)' if selected is not None else 'has the segments'} {shown}: "
            "nothing was written. Select a segment named like one of the model's classes (rename it), "
            "or choose a model trained for these segments.")
    return out


#: Slicer's editable-area modes (``vtkMRMLSegmentationNode.EditAllowed*``), by value.
EDITABLE_AREAS = {0: "everywhere", 1: "inside_all", 2: "inside_visible", 3: "outside_all",
                  4: "outside_visible", 5: "inside_segment"}
#: Slicer's overwrite modes (``vtkMRMLSegmentEditorNode.Overwrite*``), by value.
OVERWRITE_MODES = {0: "all", 1: "visible", 2: "none"}


@dataclass
class Masking:
    """The Segment Editor's masking settings (``vtkMRMLSegmentEditorNode``).

    editable: ``everywhere``, ``inside_all``, ``inside_visible``, ``outside_all``,
        ``outside_visible`` or ``inside_segment`` (then ``mask_segment`` is its id). Inside/outside
        "all segments" means all segments except the ones being written, as in Slicer.
    overwrite: ``all`` (a written voxel is removed from every other segment), ``visible`` (from
        visible segments only) or ``none`` (voxels of other segments are left to them and not
        written).
    intensity_range: ``(min, max)`` in the volume's units: only voxels inside it are editable.
    """

    editable: str = "everywhere"
    mask_segment: str | None = None
    overwrite: str = "all"
    intensity_range: tuple[float, float] | None = None

    @classmethod
    def from_editor_values(cls, mask_mode: int, mask_segment: str | None, overwrite_mode: int,
                           intensity_on: bool = False, intensity_range=None) -> "Masking":
        """From the integer settings of a ``vtkMRMLSegmentEditorNode``."""
        return cls(EDITABLE_AREAS.get(int(mask_mode), "everywhere"), mask_segment or None,
                   OVERWRITE_MODES.get(int(overwrite_mode), "all"),
                   tuple(float(v) for v in intensity_range) if intensity_on and intensity_range is not None else None)


def apply_masking(predicted: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray],
                  masking: Masking | None = None, visible: Iterable[str] | None = None,
                  intensities: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The new masks of one slice after writing ``predicted`` under the editor's rules.

    ``predicted``: ``{segmentId: bool (rows, cols)}`` for the segments being written;
    ``current``: the masks of *every* segment of the segmentation on that slice; ``visible``: ids
    of visible segments (default all); ``intensities``: the volume slice (for an intensity range).
    Returns ``{segmentId: new mask}`` for every segment that changes (written segments and
    others that lose voxels). Inside the editable area a written segment becomes its prediction;
    outside it nothing changes."""
    m = masking or Masking()
    shape = next(iter(predicted.values())).shape if predicted else next(iter(current.values())).shape
    written = set(predicted)
    others = [sid for sid in current if sid not in written]
    vis = set(current) if visible is None else set(visible)

    def union(ids):
        u = np.zeros(shape, bool)
        for sid in ids:
            u |= current[sid].astype(bool)
        return u

    if m.editable == "everywhere":
        area = np.ones(shape, bool)
    elif m.editable == "inside_all":
        area = union(others)
    elif m.editable == "inside_visible":
        area = union([s for s in others if s in vis])
    elif m.editable == "outside_all":
        area = ~union(others)
    elif m.editable == "outside_visible":
        area = ~union([s for s in others if s in vis])
    elif m.editable == "inside_segment":
        if not m.mask_segment or m.mask_segment not in current:
            raise InteractiveError("The editable area is 'inside a segment' but that segment does not exist; "
                                   "choose it again in the Segment Editor's masking settings.")
        area = current[m.mask_segment].astype(bool).copy()
    else:
        raise InteractiveError(f"Unknown editable area {m.editable!r}.")
    if m.intensity_range is not None and intensities is not None:
        lo, hi = m.intensity_range
        area &= (intensities >= lo) & (intensities <= hi)
    if m.overwrite == "none":
        area &= ~union(others)
    elif m.overwrite == "visible":
        area &= ~union([s for s in others if s not in vis])
    out = {}
    painted = np.zeros(shape, bool)
    for sid, pred in predicted.items():
        old = current.get(sid, np.zeros(shape, bool)).astype(bool)
        new = np.where(area, pred.astype(bool), old)
        painted |= new & area
        out[sid] = new
    for sid in others:
        old = current[sid].astype(bool)
        if m.overwrite == "all" or (m.overwrite == "visible" and sid in vis):
            new = old & ~painted
            if (new != old).any():
                out[sid] = new
    return out


# ------------------------------------------------------------------------------------------------
# Undo
# ------------------------------------------------------------------------------------------------
@dataclass
class UndoState:
    """The masks a write replaced: ``{(segmentId, slice): previous bool mask}`` plus segments it
    created. ``label``: what was done ("slice 12", "slices 3-9")."""

    label: str
    axis: int
    masks: dict = field(default_factory=dict)
    created: list = field(default_factory=list)
    slices: list = field(default_factory=list)


class UndoStack:
    """Undo states of in-process writes, newest last (bounded: ``limit`` states)."""

    def __init__(self, limit: int = 20):
        self.limit = limit
        self._states: list[UndoState] = []

    def push(self, state: UndoState) -> None:
        self._states.append(state)
        del self._states[:-self.limit]

    def pop(self) -> UndoState | None:
        return self._states.pop() if self._states else None

    def __len__(self) -> int:
        return len(self._states)


# ------------------------------------------------------------------------------------------------
# Corrections
# ------------------------------------------------------------------------------------------------
def _pack(mask: np.ndarray) -> tuple:
    m = np.asarray(mask, bool)
    return m.shape, np.packbits(m, axis=None)


def _unpack(packed: tuple) -> np.ndarray:
    shape, bits = packed
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


class CorrectionTracker:
    """Which slices of one volume/segmentation the user labelled or corrected.

    * **user-labelled**: slices that held labels of the tracked segments before the model wrote
      anything there (recorded by :meth:`note_user_labels`), or that the user drew on with no
      prediction (found by :meth:`refresh`).
    * **predicted**: slices the model wrote; their masks are stored (bit-packed) per segment.
    * **corrected**: predicted slices whose current masks differ from the stored prediction.

    Training uses :meth:`training_slices` (user-labelled + corrected), never an uncorrected
    prediction. Slice indices are along the model's slice axis (numpy axis of ``(K, J, I)``).
    """

    def __init__(self, segment_ids: Iterable[str] = ()):
        self.segment_ids = list(segment_ids)
        self.user_labelled: set[int] = set()
        self.corrected: set[int] = set()
        self._predicted: dict[int, dict[str, tuple]] = {}

    @property
    def predicted_slices(self) -> list[int]:
        return sorted(self._predicted)

    def note_user_labels(self, slices: Iterable[int]) -> None:
        """Slices holding the user's own labels (never overwritten by "follow")."""
        self.user_labelled.update(int(s) for s in slices if int(s) not in self._predicted)

    def record_prediction(self, index: int, masks: Mapping[str, np.ndarray]) -> None:
        """The masks the model just wrote on slice ``index`` (``{segmentId: bool 2D}``)."""
        index = int(index)
        self._predicted[index] = {sid: _pack(m) for sid, m in masks.items()}
        self.corrected.discard(index)
        for sid in masks:
            if sid not in self.segment_ids:
                self.segment_ids.append(sid)

    def forget(self, index: int) -> None:
        """Slice ``index`` is no longer a prediction (its write was undone)."""
        self._predicted.pop(int(index), None)
        self.corrected.discard(int(index))

    def refresh(self, read_masks: Callable[[Sequence[int]], Mapping[int, Mapping[str, np.ndarray]]],
                labelled_now: Iterable[int] = ()) -> set[int]:
        """Compare the predicted slices with the segmentation now; returns the corrected slices.

        ``read_masks(slices)`` -> ``{slice: {segmentId: bool 2D}}`` of the tracked segments now;
        ``labelled_now``: slices holding any tracked label now (unpredicted ones among them become
        user-labelled)."""
        predicted = self.predicted_slices
        if predicted:
            now = read_masks(predicted)
            for s in predicted:
                stored = self._predicted[s]
                cur = now.get(s, {})
                changed = False
                for sid, packed in stored.items():
                    m = cur.get(sid)
                    if m is None or not np.array_equal(np.asarray(m, bool), _unpack(packed)):
                        changed = True
                        break
                if changed:
                    self.corrected.add(s)
                else:
                    self.corrected.discard(s)
        for s in labelled_now:
            if int(s) not in self._predicted:
                self.user_labelled.add(int(s))
        return set(self.corrected)

    def training_slices(self) -> list[int]:
        """User-labelled and corrected slices, sorted: what retraining may use."""
        return sorted(self.user_labelled | self.corrected)

    def protected(self) -> set[int]:
        """Slices "follow" must never overwrite: user-labelled and corrected."""
        return self.user_labelled | self.corrected


# ------------------------------------------------------------------------------------------------
# Follow
# ------------------------------------------------------------------------------------------------
class FollowController:
    """The "follow" toggle: segment each newly shown slice once scrolling pauses (debounced).

    :meth:`shown` is called on every slice change of a watched view; :meth:`due` (from a timer)
    returns the slices to segment now: a view's slice that stayed for ``delay_s`` seconds, not yet
    predicted, and not protected (user-labelled or corrected, ``protected()``). Times come from
    ``clock`` (seconds; injectable for tests)."""

    def __init__(self, protected: Callable[[], Iterable[int]], delay_s: float = 0.3,
                 clock: Callable[[], float] = time.monotonic):
        self.protected = protected
        self.delay_s = float(delay_s)
        self.clock = clock
        self.enabled = False
        self._pending: dict[str, tuple[int, float]] = {}
        self.done: set[int] = set()

    def shown(self, view: str, index: int) -> None:
        """View ``view`` now shows slice ``index`` (restarts that view's debounce)."""
        if not self.enabled:
            return
        prev = self._pending.get(view)
        if prev is None or prev[0] != int(index):
            self._pending[view] = (int(index), self.clock())

    def due(self) -> list[int]:
        """Slices to segment now (each at most once until :meth:`reset`); never a protected one."""
        if not self.enabled:
            return []
        now, out = self.clock(), []
        guard = set(int(s) for s in self.protected())
        for view, (index, since) in list(self._pending.items()):
            if now - since < self.delay_s:
                continue
            del self._pending[view]
            if index in guard or index in self.done or index in out:
                continue
            out.append(index)
        self.done.update(out)
        return out

    def next_wait(self) -> float | None:
        """Seconds until the next pending slice is due (None: nothing pending)."""
        if not self._pending:
            return None
        now = self.clock()
        return max(0.0, min(self.delay_s - (now - t) for _, t in self._pending.values()))

    def reset(self) -> None:
        self._pending.clear()
        self.done.clear()


# ------------------------------------------------------------------------------------------------
# Label next
# ------------------------------------------------------------------------------------------------
def rank_slices(scores: Mapping[int, float], labelled: Iterable[int] = (), count: int = 5,
                min_gap: int = 2, restrict: tuple[int, int] | None = None) -> list[int]:
    """The ``count`` most uncertain slices to label next, best first.

    ``scores``: ``{slice: uncertainty}`` (higher = less sure); ``labelled`` slices are skipped;
    picks are at least ``min_gap`` slices apart from each other and from labelled slices (so
    five suggestions are not five neighbours); ``restrict``: only slices in ``[a, b]``."""
    taken = sorted(int(s) for s in labelled)
    picks: list[int] = []
    for s, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])):
        s = int(s)
        if restrict is not None and not restrict[0] <= s <= restrict[1]:
            continue
        if any(abs(s - t) < max(1, min_gap) for t in taken + picks):
            continue
        picks.append(s)
        if len(picks) >= count:
            break
    return picks


def evenly_spaced(num_slices: int, labelled: Iterable[int], count: int,
                  extent: tuple[int, int] | None = None) -> list[int]:
    """``count`` slices spread evenly over ``extent`` (default the whole scan), skipping labelled
    ones (the nearest free slice is taken): the baseline of the "label next" benchmark."""
    lo, hi = extent if extent is not None else (0, num_slices - 1)
    taken = set(int(s) for s in labelled)
    out: list[int] = []
    for q in np.linspace(lo, hi, count + 2)[1:-1]:
        for d in range(0, hi - lo + 1):
            cand = [c for c in (int(round(q)) - d, int(round(q)) + d)
                    if lo <= c <= hi and c not in taken and c not in out]
            if cand:
                out.append(cand[0])
                break
    return out


def range_between_labelled(labelled: Iterable[int], num_slices: int) -> tuple[int, int]:
    """``(first, last)`` labelled slice: the "extent between labelled slices" of "slice range".
    Raises :class:`InteractiveError` when no slice is labelled."""
    s = sorted(int(x) for x in labelled if 0 <= int(x) < num_slices)
    if not s:
        raise InteractiveError("No slice of the selected segments is labelled yet: draw on a slice first, "
                               "or give the range (from, to).")
    return s[0], s[-1]


__all__ = ["InteractiveError", "Cancelled", "ModelSessionCache", "SlicePredictor", "Masking",
           "apply_masking", "match_segments", "UndoState", "UndoStack", "CorrectionTracker",
           "FollowController", "rank_slices", "evenly_spaced", "range_between_labelled",
           "modality_warning", "sitk_geometry", "ensure_backend_importable"]
