"""In-process interactive segmentation on MRML nodes: the Segment Editor effect's glue.

:class:`InteractiveSegmenter` feeds a volume node's voxels to a cached onnxruntime session
(:mod:`TSKDSlicerLib.interactive`) and writes the labels straight into a segmentation node, slab by
slab, with the Segment Editor's masking rules, an undo state per operation and correction tracking.
No file, no subprocess. Only calls that exist in both the Slicer application and the
``slicer-core`` wheel are used (``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``,
``vtkOrientedImageDataResample``), so it is tested on a real ``vtkMRMLScene`` in CI.

Geometry: the volume's voxel grid ``(K, J, I)`` is the frame of every mask here; it is placed in
the segmentation's own coordinates with :func:`TSKDSlicerLib.mrml_io.volume_grid_in` (linear
transforms between the two nodes are honoured). A *slab* is the index range ``[lo, hi]`` along
one numpy axis (0 = k, 1 = j, 2 = i) with the full extent of the other two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from . import interactive, labels, mrml_io
from .interactive import (Cancelled, CorrectionTracker, InteractiveError, Masking, ModelSessionCache, UndoStack,
                          UndoState, _pack, _unpack, apply_masking, match_segments)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Slabs of segments on the volume grid
# ------------------------------------------------------------------------------------------------
def _dims(volumeNode) -> tuple[int, int, int]:
    i, j, k = volumeNode.GetImageData().GetDimensions()
    return k, j, i


def _slab_extent(volumeNode, axis: int, lo: int, hi: int) -> list[int]:
    i, j, k = volumeNode.GetImageData().GetDimensions()
    ext = [0, i - 1, 0, j - 1, 0, k - 1]
    a = 2 - axis  # IJK axis
    ext[2 * a], ext[2 * a + 1] = int(lo), int(hi)
    return ext


def _reference(segmentationNode, volumeNode, extent) -> "slicer.vtkOrientedImageData":
    img = slicer.vtkOrientedImageData()
    img.SetExtent(*extent)
    img.SetGeometryFromImageToWorldMatrix(mrml_io.volume_grid_in(segmentationNode, volumeNode))
    return img


def _to_numpy(image, extent) -> np.ndarray:
    """``(k, j, i)`` array of an oriented image over ``extent`` (zeros where it has no scalars)."""
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    scalars = image.GetPointData().GetScalars() if image is not None and image.GetPointData() else None
    if scalars is None:
        return np.zeros(shape, np.uint8)
    return numpy_support.vtk_to_numpy(scalars).reshape(shape)


def _segment_image(segmentationNode, segmentId):
    rep = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, rep)
    return rep


def _empty(image) -> bool:
    ext = image.GetExtent()
    return ext[0] > ext[1] or ext[2] > ext[3] or ext[4] > ext[5] or image.GetPointData().GetScalars() is None


def read_slab(segmentationNode, volumeNode, segmentId: str, axis: int, lo: int, hi: int) -> np.ndarray:
    """Segment ``segmentId`` on slices ``lo..hi`` along numpy ``axis`` of the volume grid:
    a bool array shaped like ``arrayFromVolume(volume)`` restricted to that slab."""
    extent = _slab_extent(volumeNode, axis, lo, hi)
    rep = _segment_image(segmentationNode, segmentId)
    if _empty(rep):
        return np.zeros(_to_numpy(None, extent).shape, bool)
    out = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        rep, _reference(segmentationNode, volumeNode, extent), out, False)
    return _to_numpy(out, extent) > 0


def _same_grid(a, b, tol: float = 1e-6) -> bool:
    """True when two oriented images share the image-to-world matrix (same voxel grid)."""
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetImageToWorldMatrix(ma)
    b.GetImageToWorldMatrix(mb)
    return all(abs(ma.GetElement(r, c) - mb.GetElement(r, c)) <= tol for r in range(4) for c in range(4))


def _rep_extent_on_grid(rep, segmentationNode, volumeNode) -> list[int] | None:
    """Extent (volume IJK, clipped to the volume) covering the segment's stored labelmap."""
    if _empty(rep):
        return None
    toWorld = vtk.vtkMatrix4x4()
    rep.GetImageToWorldMatrix(toWorld)
    grid = mrml_io.volume_grid_in(segmentationNode, volumeNode)
    inv = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(grid, inv)
    e = rep.GetExtent()
    pts = []
    for x in (e[0], e[1]):  # corner voxel centres
        for y in (e[2], e[3]):
            for z in (e[4], e[5]):
                w = toWorld.MultiplyPoint([x, y, z, 1.0])
                pts.append(inv.MultiplyPoint(w)[:3])
    pts = np.array(pts)
    i, j, k = volumeNode.GetImageData().GetDimensions()
    lo_f, hi_f = pts.min(0), pts.max(0)
    exact = np.allclose(lo_f, np.round(lo_f), atol=1e-3) and np.allclose(hi_f, np.round(hi_f), atol=1e-3)
    margin = 0 if exact else 1  # same grid: exact indices; another grid: one voxel of margin
    lo = np.maximum(np.floor(lo_f + 1e-3).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(hi_f - 1e-3).astype(int) + margin, [i - 1, j - 1, k - 1])
    if np.any(lo > hi):
        return None
    return [int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])]


def write_slab(segmentationNode, volumeNode, segmentId: str, axis: int, lo: int, hi: int,
               mask: np.ndarray) -> None:
    """Replace segment ``segmentId`` on slices ``lo..hi`` (numpy ``axis``) with ``mask`` (bool,
    shaped like the slab); voxels outside the slab and other segments are kept.

    The segment's labelmap is rebuilt over the union of its current extent and the slab (not the
    whole volume) and set with ``MODE_REPLACE``. Raises :class:`mrml_io.MRMLIOError` on failure."""
    extent = _slab_extent(volumeNode, axis, lo, hi)
    rep = _segment_image(segmentationNode, segmentId)
    cur = _rep_extent_on_grid(rep, segmentationNode, volumeNode)
    union = list(extent)
    if cur is not None:
        for a in range(3):
            union[2 * a] = min(union[2 * a], cur[2 * a])
            union[2 * a + 1] = max(union[2 * a + 1], cur[2 * a + 1])
    ref = _reference(segmentationNode, volumeNode, union)
    shape_u = (union[5] - union[4] + 1, union[3] - union[2] + 1, union[1] - union[0] + 1)
    if cur is not None and list(rep.GetExtent()) == union and _same_grid(rep, ref):
        target = rep  # the segment's own copy already covers the union on this grid: edit it in place
    elif cur is not None:
        target = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(rep, ref, target, False)
    else:
        target = ref
        target.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(target.GetPointData().GetScalars())[:] = 0
    arr = numpy_support.vtk_to_numpy(target.GetPointData().GetScalars()).reshape(shape_u)
    o = (extent[4] - union[4], extent[2] - union[2], extent[0] - union[0])
    shape = mask.shape
    arr[o[0]:o[0] + shape[0], o[1]:o[1] + shape[1], o[2]:o[2] + shape[2]] = mask.astype(arr.dtype)
    target.GetPointData().GetScalars().Modified()
    ref = target
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(ref, segmentationNode, segmentId, logic.MODE_REPLACE):
        name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        raise mrml_io.MRMLIOError(f"Could not write segment {name!r} of {segmentationNode.GetName()!r}.")


_UID_ATTRIBUTE = "TSKD.SessionKey"


def _uid(node) -> str:
    """A key unique to ``node`` for this session (node IDs repeat across scenes): a random
    attribute set on first use."""
    key = node.GetAttribute(_UID_ATTRIBUTE)
    if not key:
        import uuid

        key = uuid.uuid4().hex
        node.SetAttribute(_UID_ATTRIBUTE, key)
    return key


def _runs(indices: Sequence[int], max_len: int) -> list[tuple[int, int]]:
    """Sorted unique indices -> ``[(lo, hi)]`` runs of consecutive indices, at most ``max_len`` long."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(int(i) for i in indices)):
        if out and s == out[-1][1] + 1 and s - out[-1][0] < max_len:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def _take(array: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    sl = [slice(None)] * 3
    sl[axis] = slice(lo, hi + 1)
    return array[tuple(sl)]


def _slice_of(slab: np.ndarray, axis: int, n: int) -> np.ndarray:
    return np.take(slab, n, axis=axis)


# ------------------------------------------------------------------------------------------------
# The segmenter
# ------------------------------------------------------------------------------------------------
class InteractiveSegmenter:
    """In-process segmentation of slices into a segmentation node (console API and effect).

    One instance per Slicer session: it keeps the model sessions (:class:`ModelSessionCache`),
    a :class:`SlicePredictor` per volume and model (rebuilt when the voxels change), an
    :class:`UndoStack` per segmentation and a :class:`CorrectionTracker` per (segmentation,
    volume). ``warn``: called with each warning text (modality mismatch), once per volume and model.
    """

    def __init__(self, sessions: ModelSessionCache | None = None, warn: Callable[[str], None] | None = None):
        self.sessions = sessions or ModelSessionCache()
        self.warn = warn or (lambda text: log.warning(text))
        self._predictors: dict = {}
        self._undo: dict[str, UndoStack] = {}
        self._trackers: dict[tuple, CorrectionTracker] = {}
        self._warned: set = set()
        self.last_warnings: list[str] = []

    # -- model and volume ------------------------------------------------------------------------
    def package(self, modelDir: str):
        """The loaded, checksum-verified model package (cached; see :class:`ModelSessionCache`)."""
        return self.sessions.get(modelDir)

    def predictor(self, volumeNode, modelDir: str) -> interactive.SlicePredictor:
        """The :class:`SlicePredictor` of ``volumeNode`` with ``modelDir`` (cached while the
        volume's voxels and the package are unchanged). Raises :class:`InteractiveError`."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise InteractiveError("Select a volume with image data.")
        if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
            raise InteractiveError(f"{volumeNode.GetName()!r} has several components per voxel (RGB or vector): "
                                   "convert it to a scalar volume (Vector to Scalar Volume module) first.")
        pkg = self.package(modelDir)
        key = (_uid(volumeNode), volumeNode.GetImageData().GetMTime(), volumeNode.GetMTime(),
               interactive._model_key(modelDir))
        pred = self._predictors.get(key)
        if pred is None:
            array = slicer.util.arrayFromVolume(volumeNode)
            pred = interactive.SlicePredictor(pkg, array, mrml_io.ijk_to_ras(volumeNode), volumeNode.GetName())
            for old in [k for k in self._predictors if k[0] == key[0]]:
                del self._predictors[old]
            self._predictors[key] = pred
            wkey = (key[0], key[3][0])
            if wkey not in self._warned:
                self._warned.add(wkey)
                text = interactive.modality_warning(pkg.card, array, volumeNode.GetName(),
                                                    volumeNode.GetAttribute("DICOM.Modality"))
                if text:
                    self.last_warnings.append(text)
                    self.warn(text)
        return pred

    def tracker(self, segmentationNode, volumeNode) -> CorrectionTracker:
        key = (_uid(segmentationNode), _uid(volumeNode))
        if key not in self._trackers:
            self._trackers[key] = CorrectionTracker()
        return self._trackers[key]

    def undoStack(self, segmentationNode) -> UndoStack:
        return self._undo.setdefault(_uid(segmentationNode), UndoStack())

    # -- segments ----------------------------------------------------------------------------------
    def targetSegments(self, segmentationNode, modelDir: str, segmentIds: Sequence[str] | None = None,
                       create: bool = True) -> tuple[dict[str, int], list[str]]:
        """``({segmentId: class index}, created ids)``. An empty segmentation gets one segment per
        model class (name and colour from the card) when ``create``. Raises
        :class:`InteractiveError` (nothing written) when the segments do not match the classes."""
        pkg = self.package(modelDir)
        names = pkg.class_map.names
        segmentation = segmentationNode.GetSegmentation()
        created = []
        if segmentation.GetNumberOfSegments() == 0 and create and not segmentIds:
            for c in mrml_io.classes_from_card(pkg.card):
                created.append(segmentation.AddEmptySegment("", c["name"], list(c["color"])))
        seg_names = {segmentation.GetNthSegmentID(n): segmentation.GetNthSegment(n).GetName()
                     for n in range(segmentation.GetNumberOfSegments())}
        try:
            mapping = match_segments(names, seg_names, list(segmentIds) if segmentIds else None,
                                     pkg.card.get("name") or str(modelDir), segmentationNode.GetName())
        except InteractiveError:
            for sid in created:
                segmentation.RemoveSegment(sid)
            raise
        return mapping, created

    def labelledSlices(self, segmentationNode, volumeNode, segmentIds: Sequence[str], axis: int) -> list[int]:
        """Slices along ``axis`` holding any voxel of ``segmentIds`` now."""
        if not segmentIds:
            return []
        array = mrml_io.segments_to_label_array(segmentationNode, list(segmentIds), volumeNode)
        return labels.labelled_slices(array, axis)

    # -- segmenting --------------------------------------------------------------------------------
    def segment(self, volumeNode, segmentationNode, modelDir: str, slices: Sequence[int],
                segmentIds: Sequence[str] | None = None, masking: Masking | None = None,
                visibleIds: Sequence[str] | None = None, protect: bool = False, chunk: int = 16,
                progress: Callable[[int, int], None] | None = None,
                cancelled: Callable[[], bool] | None = None, label: str = "", cleanup=None) -> dict:
        """Segment ``slices`` (indices along the model's slice axis) into ``segmentationNode``.

        Only ``segmentIds`` (default: every segment named like a model class) are written, each on
        the voxels of its class, under ``masking`` (the editor's editable area and overwrite
        mode; ``visibleIds``: the visible segments). ``protect``: slices the user labelled or
        corrected are left untouched ("follow", ranges). Runs in slabs of ``chunk`` slices;
        ``progress(done, total)`` after each, :class:`Cancelled` when ``cancelled()`` (the
        slabs written so far stay and are part of the undo state). One undo state per call.

        ``cleanup``: a :class:`TSKDLib.deploy.inference.Cleanup` (``tskd segment``'s default is
        ``Cleanup.for_package``: the model card's one-object classes). Every slice is then
        predicted first and each run of consecutive slices is cleaned in 3D before anything is
        written, so the whole volume gets exactly the labels of ``tskd segment`` with the same
        clean-up; ``progress`` counts the predicted slices, and a Cancel writes nothing
        (:class:`Cancelled` with ``kept=False``; segments this call created are removed).

        Returns ``{"slices": written, "skipped": protected slices left alone, "axis",
        "segments": {segmentId: class}, "warnings"}``. Raises :class:`InteractiveError` (nothing
        written) for a model/segment mismatch, a refused model or volume, or an index outside
        the volume."""
        self.last_warnings = []
        mapping, created = self.targetSegments(segmentationNode, modelDir, segmentIds)
        try:
            pred = self.predictor(volumeNode, modelDir)
        except InteractiveError:
            for sid in created:
                segmentationNode.GetSegmentation().RemoveSegment(sid)
            raise
        axis = pred.axis
        slices = sorted(set(int(s) for s in slices))
        bad = [s for s in slices if not 0 <= s < pred.num_slices]
        if bad:
            raise InteractiveError(f"Slice(s) {bad[:5]} outside {volumeNode.GetName()!r} "
                                   f"(0..{pred.num_slices - 1} along its slice axis).")
        segmentation = segmentationNode.GetSegmentation()
        all_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        tracker = self.tracker(segmentationNode, volumeNode)
        undo = UndoState(label or _describe(slices), axis, {}, list(created))
        written, skipped = [], []
        volume_array = pred.array
        need_others = masking is not None and (masking.editable != "everywhere" or masking.overwrite != "all") \
            or len(all_ids) > len(mapping)
        cleaned = None
        if cleanup is not None and cleanup.active:
            try:
                cleaned = self._predictCleaned(pred, slices, cleanup, progress, cancelled)
            except Cancelled:
                for sid in created:
                    segmentation.RemoveSegment(sid)
                raise Cancelled("Cancelled before anything was written: the segmentation is unchanged.",
                                kept=False) from None
            progress = None  # it counted the predictions; writing is quick
        try:
            done = 0
            for lo, hi in _runs(slices, chunk):
                if cancelled is not None and cancelled():
                    raise Cancelled("cancelled")
                run = list(range(lo, hi + 1))
                labels_by_slice = cleaned if cleaned is not None else pred.predict(run, batch_size=8)
                current = {sid: read_slab(segmentationNode, volumeNode, sid, axis, lo, hi)
                           for sid in (all_ids if need_others else mapping)}
                predicted = {sid: np.stack([labels_by_slice[s] == k for s in run], axis=axis)
                             for sid, k in mapping.items()}
                keep = []
                for n, s in enumerate(run):
                    if protect and self._isProtected(tracker, s, {sid: _slice_of(current[sid], axis, n)
                                                                  for sid in mapping}):
                        keep.append(n)
                for n in keep:  # a protected slice keeps what is there
                    idx = [slice(None)] * 3
                    idx[axis] = n
                    for sid in mapping:
                        predicted[sid][tuple(idx)] = current[sid][tuple(idx)]
                new = apply_masking(predicted, current, masking, visibleIds,
                                    _take(volume_array, axis, lo, hi))
                for n in keep:  # nothing changes on a protected slice, in any segment
                    idx = [slice(None)] * 3
                    idx[axis] = n
                    for sid, mask in new.items():
                        if sid in current:
                            mask[tuple(idx)] = current[sid][tuple(idx)]
                for sid, mask in new.items():
                    if sid in current and np.array_equal(mask, current[sid]):
                        continue
                    prev = current[sid] if sid in current else read_slab(segmentationNode, volumeNode, sid, axis, lo, hi)
                    undo.masks[(sid, lo, hi)] = _pack(prev)
                    write_slab(segmentationNode, volumeNode, sid, axis, lo, hi, mask)
                for n, s in enumerate(run):
                    if n in keep:
                        skipped.append(s)
                        continue
                    tracker.record_prediction(s, {sid: _slice_of(new.get(sid, current.get(sid)), axis, n)
                                                  for sid in mapping})
                    written.append(s)
                done += len(run)
                if progress is not None:
                    progress(done, len(slices))
        finally:
            if undo.masks or undo.created:
                undo.slices = list(written)
                self.undoStack(segmentationNode).push(undo)
        return {"slices": written, "skipped": skipped, "axis": axis, "segments": mapping,
                "warnings": list(self.last_warnings)}

    @staticmethod
    def _predictCleaned(pred: interactive.SlicePredictor, slices: Sequence[int], cleanup,
                        progress: Callable[[int, int], None] | None,
                        cancelled: Callable[[], bool] | None) -> dict[int, np.ndarray]:
        """Labels of ``slices`` (``{s: (rows, cols)}``, volume slice orientation) with ``cleanup``
        applied in 3D to each run of consecutive slices, stacked on the volume grid ``(K, J, I)``
        (connected components and hole filling do not depend on the axis order; the spacing,
        mm, is the volume's). Raises :class:`Cancelled` when ``cancelled()``."""
        from TSKDLib.data.geometry import ArrayGeometry
        from TSKDLib.deploy.inference import cleanup_labels

        num_classes = len(pred.package.class_map.names)
        sx, sy, sz = (float(v) for v in pred.image.GetSpacing())
        volume_geometry = ArrayGeometry.of(pred.image)  # the one-object classes' locations are in LPS
        out: dict[int, np.ndarray] = {}
        done = 0
        for lo, hi in _runs(slices, len(slices)):
            run = list(range(lo, hi + 1))

            def step(d, _t, base=done):
                if progress is not None:
                    progress(base + d, len(slices))

            by_slice = pred.predict(run, batch_size=8, progress=step, cancelled=cancelled)
            volume = cleanup_labels(np.stack([by_slice[s] for s in run], axis=pred.axis), num_classes,
                                    (sz, sy, sx), cleanup, volume_geometry.shifted(pred.axis, lo))
            out.update({s: np.take(volume, n, axis=pred.axis) for n, s in enumerate(run)})
            done += len(run)
        return out

    def _isProtected(self, tracker: CorrectionTracker, s: int, masks_now: dict) -> bool:
        if s in tracker.protected():
            return True
        stored = tracker._predicted.get(s)
        if stored is None:
            if any(np.any(m) for m in masks_now.values()):
                tracker.user_labelled.add(s)  # labels the model did not write: the user's
                return True
            return False
        for sid, m in masks_now.items():
            packed = stored.get(sid)
            if packed is not None and not np.array_equal(np.asarray(m, bool), _unpack(packed)):
                tracker.corrected.add(s)
                return True
        return False

    def undo(self, segmentationNode, volumeNode) -> str | None:
        """Undo the last in-process write into ``segmentationNode``; returns its label (None:
        nothing to undo). The previous masks of every changed slab are put back."""
        state = self.undoStack(segmentationNode).pop()
        if state is None:
            return None
        segmentation = segmentationNode.GetSegmentation()
        for (sid, lo, hi), packed in state.masks.items():
            if segmentation.GetSegment(sid) is not None and sid not in state.created:
                write_slab(segmentationNode, volumeNode, sid, state.axis, lo, hi, _unpack(packed))
        for sid in state.created:
            if segmentation.GetSegment(sid) is not None:
                segmentation.RemoveSegment(sid)
        tracker = self.tracker(segmentationNode, volumeNode)
        for s in getattr(state, "slices", []):
            tracker.forget(s)
        return state.label

    # -- corrections and suggestions ----------------------------------------------------------
    def correctedSlices(self, segmentationNode, volumeNode, modelDir: str | None = None) -> list[int]:
        """Predicted slices the user changed since (compared with the stored prediction)."""
        tracker = self.tracker(segmentationNode, volumeNode)
        predicted = tracker.predicted_slices
        if not predicted:
            return []
        axis = self._axisFor(volumeNode, modelDir)

        def read(slices):
            out = {}
            for s in slices:
                out[s] = {sid: _slice_of(read_slab(segmentationNode, volumeNode, sid, axis, s, s), axis, 0)
                          for sid in tracker.segment_ids
                          if segmentationNode.GetSegmentation().GetSegment(sid) is not None}
            return out

        return sorted(tracker.refresh(read))

    def trainingSlices(self, segmentationNode, volumeNode, modelDir: str | None = None,
                       segmentIds: Sequence[str] | None = None) -> list[int]:
        """Slices retraining may use: labelled by the user (never predicted) or corrected."""
        tracker = self.tracker(segmentationNode, volumeNode)
        self.correctedSlices(segmentationNode, volumeNode, modelDir)
        ids = list(segmentIds) if segmentIds else (tracker.segment_ids or _all_ids(segmentationNode))
        axis = self._axisFor(volumeNode, modelDir)
        tracker.note_user_labels(self.labelledSlices(segmentationNode, volumeNode, ids, axis))
        return tracker.training_slices()

    def _axisFor(self, volumeNode, modelDir):
        for key, pred in self._predictors.items():
            if key[0] == _uid(volumeNode) and (modelDir is None or key[3][0] == interactive._model_key(modelDir)[0]):
                return pred.axis
        if modelDir is None:
            raise InteractiveError("Segment something with a model first.")
        return self.predictor(volumeNode, modelDir).axis

    def suggest(self, volumeNode, modelDir: str, count: int = 5, labelled: Sequence[int] = (),
                minGap: int = 2, extent: tuple[int, int] | None = None) -> list[tuple[int, float]]:
        """The ``count`` unlabelled slices where the student is least sure (the area it expects to
        have wrong, :meth:`SlicePredictor.uncertainty`: the score of ``tskd segment``'s slices to
        check), best first: ``[(slice, mm^2)]``. ``extent``
        restricts the search (default: the whole scan). Raises :class:`InteractiveError` for a
        one-slice image."""
        pred = self.predictor(volumeNode, modelDir)
        if pred.num_slices < 2:
            raise InteractiveError(f"{volumeNode.GetName()!r} has a single slice: there is no other slice to suggest.")
        lo, hi = extent if extent is not None else (0, pred.num_slices - 1)
        scores = pred.uncertainty(range(lo, hi + 1))
        picks = interactive.rank_slices(scores, labelled, count, minGap)
        return [(s, scores[s]) for s in picks]


def quick_update_inputs(volumeNode, segmentationNode, mapping: dict, classNames: Sequence[str],
                        slices: Sequence[int], outDir: str) -> dict:
    """Write what ``tskd update`` reads for a quick update from the scene, into ``outDir``.

    ``mapping``: ``{segmentId: class index 1..K}`` (every class of the model; see
    :meth:`InteractiveSegmenter.targetSegments`); ``classNames``: the model's K class names;
    ``slices``: the corrected/labelled slices (model slice axis). Files: the volume (its own grid),
    the labels (values 1..K in class order) and a class map naming them like the model. Returns
    ``{"image", "labels", "class_map", "slices"}`` (``slices`` as ``"12,17-18"``) for the
    command line ``tskd update MODEL --image ... --labels ... --class-map ... --slices ...``."""
    import json
    import os

    ordered = sorted(mapping, key=lambda sid: mapping[sid])
    exported = mrml_io.export_training_inputs(volumeNode, segmentationNode, ordered, outDir)
    classMap = os.path.join(outDir, "classes.json")
    with open(classMap, "w", encoding="utf-8") as f:
        json.dump({"classes": [{"value": n, "name": classNames[mapping[sid] - 1]}
                               for n, sid in enumerate(ordered, start=1)]}, f)
    return {"image": exported["image"], "labels": exported["labels"], "class_map": classMap,
            "slices": labels.compress_ranges(slices)}


def _all_ids(segmentationNode) -> list[str]:
    seg = segmentationNode.GetSegmentation()
    return [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())]


def _describe(slices: Sequence[int]) -> str:
    if len(slices) == 1:
        return f"TSKD slice {slices[0]}"
    return f"TSKD slices {labels.compress_ranges(slices)}"


def masking_from_editor_node(editorNode, segmentationNode=None) -> Masking:
    """The masking settings of a ``vtkMRMLSegmentEditorNode`` (Slicer 5.x API: mask mode,
    mask segment, overwrite mode, source volume intensity range)."""
    intensity_on = bool(editorNode.GetSourceVolumeIntensityMask()) if hasattr(editorNode, "GetSourceVolumeIntensityMask") \
        else bool(editorNode.GetMasterVolumeIntensityMask())
    rng = editorNode.GetSourceVolumeIntensityMaskRange() if hasattr(editorNode, "GetSourceVolumeIntensityMaskRange") \
        else editorNode.GetMasterVolumeIntensityMaskRange()
    return Masking.from_editor_values(editorNode.GetMaskMode(), editorNode.GetMaskSegmentID(),
                                      editorNode.GetOverwriteMode(), intensity_on, tuple(rng))


def visible_segment_ids(segmentationNode) -> list[str] | None:
    """Ids of the segments visible in the segmentation's display node (None: no display node)."""
    display = segmentationNode.GetDisplayNode()
    if display is None:
        return None
    out = vtk.vtkStringArray()
    display.GetVisibleSegmentIDs(out)
    return [out.GetValue(n) for n in range(out.GetNumberOfValues())]


__all__ = ["InteractiveSegmenter", "read_slab", "write_slab", "quick_update_inputs", "masking_from_editor_node", "visible_segment_ids",
           "Cancelled", "InteractiveError"]
