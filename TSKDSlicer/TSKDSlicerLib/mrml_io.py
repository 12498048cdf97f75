"""MRML glue: volumes and segmentations to and from the files the TSKD backend reads and writes.

Everything here uses only calls that exist both in the Slicer application and in Kitware's
``slicer-core`` wheel (MRML nodes, storage nodes, ``vtkSlicerSegmentationsModuleLogic`` statics,
subject hierarchy), so it is tested in CI on a real ``vtkMRMLScene`` without the application.
Nothing here imports ``qt``, ``ctk`` or uses ``slicer.modules``/``slicer.app``.

Coordinate systems
------------------
MRML works in RAS; ITK/NIfTI/NRRD files store LPS. The storage nodes convert between the two, so a
file written here and read with SimpleITK has the same voxel grid (same array, origin/direction
flipped to LPS). Label files are always written on the *reference volume's* voxel grid
(``EXTENT_REFERENCE_GEOMETRY``): voxel ``(k, j, i)`` of the label array is voxel ``(k, j, i)`` of
the image file. Geometry is never resampled when the segmentation already shares the volume's
grid (the normal case after drawing in the Segment Editor).

Numpy arrays of volumes are indexed ``(k, j, i)`` (slice, row, column), as in
``slicer.util.arrayFromVolume``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import slicer
import vtk

# Class map written beside the labels file (``labels.nii.gz`` -> ``labels.json``), the backend's
# convention: ``{"classes": [{"value": 1, "name": "liver", "color": [r, g, b]}]}``, colours 0..255.
CLASS_MAP_SUFFIX = ".json"


class MRMLIOError(RuntimeError):
    """Raised when a node cannot be exported or a result cannot be imported; the message says why."""


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------

def register_converter_rules() -> None:
    """Register the segmentation representation converters if nobody did.

    The Slicer application registers them at start-up; the ``slicer-core`` wheel does not, and
    without them segmentations cannot be converted (closed surface, labelmap) or imported.
    Safe to call any number of times.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    rules = factory.GetConverterRules()
    present = {rules[i].GetClassName() for i in range(len(rules))} if rules is not None else set()
    for cls in ("vtkBinaryLabelmapToClosedSurfaceConversionRule",
                "vtkClosedSurfaceToBinaryLabelmapConversionRule",
                "vtkClosedSurfaceToFractionalLabelmapConversionRule",
                "vtkFractionalLabelmapToClosedSurfaceConversionRule"):
        if cls not in present and hasattr(slicer, cls):
            factory.RegisterConverterRule(getattr(slicer, cls)())


def _scene_of(node):
    scene = node.GetScene() if node is not None else None
    if scene is None:
        raise MRMLIOError(f"Node {node.GetName() if node else None!r} is not in a scene.")
    return scene


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------

def load_volume(scene, path: str, name: str | None = None, labelmap: bool = False):
    """Read an image file (NRRD, NIfTI, a DICOM file of a series, ...) into a new volume node.

    Returns a ``vtkMRMLScalarVolumeNode`` (or ``vtkMRMLLabelMapVolumeNode`` if ``labelmap``) whose
    IJK-to-RAS matrix reproduces the file's geometry (LPS in the file, RAS in the node).
    Raises :class:`MRMLIOError` if the file cannot be read.
    """
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name or _basename(path))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(path)
        storage.SetCenterImage(0)
        if not storage.ReadData(node) or node.GetImageData() is None:
            scene.RemoveNode(node)
            raise MRMLIOError(f"{path}: could not read the image file.")
    finally:
        scene.RemoveNode(storage)
    return node


def write_volume(volumeNode, path: str) -> str:
    """Write a volume node to ``path`` (``.nrrd``, ``.nii``, ``.nii.gz``, ``.mha``) with its geometry.

    The file gets the node's own voxel grid and IJK-to-RAS matrix (converted to LPS). A parent
    transform is *not* hardened into the file: the backend works on the voxel grid the user sees,
    and the labels are exported on the same grid. Returns ``path``.
    """
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise MRMLIOError("No image data in the volume to export.")
    scene = _scene_of(volumeNode)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(path)
        storage.SetUseCompression(1)
        if not storage.WriteData(volumeNode):
            raise MRMLIOError(f"{path}: could not write volume {volumeNode.GetName()!r}.")
    finally:
        scene.RemoveNode(storage)
    return path


def ijk_to_ras(volumeNode) -> np.ndarray:
    """The volume's 4x4 IJK-to-RAS matrix as a numpy array (columns i, j, k, translation)."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# ---------------------------------------------------------------------------------------------
# Segmentations -> backend files
# ---------------------------------------------------------------------------------------------

def segment_names(segmentationNode, segmentIds: Sequence[str]) -> list[str]:
    """Names of ``segmentIds`` in order; raises if one does not exist."""
    seg = segmentationNode.GetSegmentation()
    names = []
    for sid in segmentIds:
        segment = seg.GetSegment(sid)
        if segment is None:
            raise MRMLIOError(f"Segment {sid!r} is not in segmentation {segmentationNode.GetName()!r}.")
        names.append(segment.GetName())
    return names


def segments_to_label_array(segmentationNode, segmentIds: Sequence[str], referenceVolumeNode,
                            scene=None) -> np.ndarray:
    """Merge ``segmentIds`` into one label array on the reference volume's grid.

    Returns a ``(K, J, I)`` uint8/uint16 array where segment ``segmentIds[n]`` has value ``n + 1``
    and 0 is background. Where segments overlap, the later one in the list wins. Uses
    ``ExportSegmentsToLabelmapNode`` with ``EXTENT_REFERENCE_GEOMETRY``, which takes any
    transform between the segmentation and the volume into account.
    """
    labelmap = _export_labelmap_node(segmentationNode, segmentIds, referenceVolumeNode, scene)
    try:
        return _label_array(labelmap, referenceVolumeNode)
    finally:
        labelmap.GetScene().RemoveNode(labelmap)


def _label_array(labelmap, referenceVolumeNode) -> np.ndarray:
    """The exported labelmap as a ``(K, J, I)`` array; all zeros when the export holds no voxels
    (empty segments, segments outside the volume), which vtk leaves without scalars."""
    image = labelmap.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        i, j, k = referenceVolumeNode.GetImageData().GetDimensions()
        return np.zeros((k, j, i), dtype=np.uint8)
    return slicer.util.arrayFromVolume(labelmap).copy()


def _export_labelmap_node(segmentationNode, segmentIds, referenceVolumeNode, scene=None):
    if not segmentIds:
        raise MRMLIOError("No segment selected.")
    scene = scene or _scene_of(segmentationNode)
    register_converter_rules()
    segment_names(segmentationNode, segmentIds)  # validates ids
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "TSKD_export_labels")
    ids = vtk.vtkStringArray()
    for sid in segmentIds:
        ids.InsertNextValue(sid)
    # A colour table fixes the label value of each segment to its position in segmentIds + 1.
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "TSKD_export_colors")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(len(segmentIds) + 1)
    colors.SetColor(0, "background", 0, 0, 0, 0)
    for n, name in enumerate(segment_names(segmentationNode, segmentIds), start=1):
        colors.SetColor(n, name, 1, 1, 1, 1)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmap, referenceVolumeNode,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
    finally:
        scene.RemoveNode(colors)
    if not ok or labelmap.GetImageData() is None:
        scene.RemoveNode(labelmap)
        raise MRMLIOError(f"Could not export segments of {segmentationNode.GetName()!r} "
                          f"to the grid of {referenceVolumeNode.GetName()!r}.")
    return labelmap


def export_training_inputs(volumeNode, segmentationNode, segmentIds: Sequence[str], outDir: str,
                           imageName: str = "image.nrrd", labelsName: str = "labels.nii.gz") -> dict:
    """Write one case for ``tskd train``: the image, the merged labels and the class map.

    Files in ``outDir``: ``imageName`` (the volume, its own grid), ``labelsName`` (label values
    ``1..N`` for ``segmentIds`` in order, same grid) and ``<labels stem>.json``, the class map
    ``{"classes": [{"value": 1, "name": "<segment name>", "color": [r, g, b]}]}`` (0..255).
    Returns ``{"image", "labels", "class_map", "classes", "array"}``: ``classes`` is
    ``{"1": "<segment name>", ...}`` and ``array`` the ``(K, J, I)`` label array.

    Raises :class:`MRMLIOError` if a node is missing or empty, or a segment id is unknown.
    """
    if volumeNode is None or segmentationNode is None:
        raise MRMLIOError("Select a volume and a segmentation.")
    os.makedirs(outDir, exist_ok=True)
    scene = _scene_of(volumeNode)
    image_path = write_volume(volumeNode, os.path.join(outDir, imageName))
    labelmap = _export_labelmap_node(segmentationNode, segmentIds, volumeNode, scene)
    try:
        array = _label_array(labelmap, volumeNode)
        labels_path = write_volume(labelmap, os.path.join(outDir, labelsName))
    finally:
        scene.RemoveNode(labelmap)
    names = segment_names(segmentationNode, segmentIds)
    classes = {str(n): name for n, name in enumerate(names, start=1)}
    seg = segmentationNode.GetSegmentation()
    records = [{"value": n, "name": name,
                "color": [int(round(255 * c)) for c in seg.GetSegment(sid).GetColor()]}
               for n, (sid, name) in enumerate(zip(segmentIds, names), start=1)]
    class_map_path = os.path.join(outDir, _stem(labelsName) + CLASS_MAP_SUFFIX)
    with open(class_map_path, "w", encoding="utf-8") as f:
        json.dump({"classes": records}, f, indent=1)
    return {"image": image_path, "labels": labels_path, "class_map": class_map_path,
            "classes": classes, "array": array}


# ---------------------------------------------------------------------------------------------
# Backend labelmaps -> segmentation
# ---------------------------------------------------------------------------------------------

def normalise_color(color) -> tuple[float, float, float]:
    """A model-card colour (``[r, g, b]`` in 0..255 or 0..1) as floats in 0..1."""
    if not color or len(color) < 3:
        return (0.5, 0.5, 0.5)
    rgb = [float(c) for c in color[:3]]
    if any(c > 1.0 for c in rgb):
        rgb = [c / 255.0 for c in rgb]
    return tuple(min(max(c, 0.0), 1.0) for c in rgb)


def classes_from_card(card: dict) -> list[dict]:
    """The model card's classes as ``[{"value", "name", "color"}]`` sorted by value.

    ``value`` is the label value in the labelmap the backend writes (``value`` in the card, or
    ``index`` when absent). Raises :class:`MRMLIOError` when the card has no classes.
    """
    out = []
    for n, c in enumerate(card.get("classes") or [], start=1):
        value = c.get("value", c.get("index", n))
        out.append({"value": int(value), "name": str(c.get("name") or f"class {value}"),
                    "color": normalise_color(c.get("color"))})
    if not out:
        raise MRMLIOError("The model card lists no classes.")
    return sorted(out, key=lambda c: c["value"])


def labelmap_to_segmentation(labelmapNode, classes: Sequence[dict], segmentationNode=None,
                             referenceVolumeNode=None, name: str | None = None):
    """Turn a labelmap node into segments named and coloured from ``classes``.

    ``classes`` are ``{"value", "name", "color"}`` dicts (see :func:`classes_from_card`). One
    segment per class, in class order; classes absent from the labelmap get an empty segment so
    the segment list is always the model's. Voxel values not in ``classes`` are ignored. The
    segments keep the labelmap's exact grid. Returns the segmentation node (new if not given).
    """
    scene = _scene_of(labelmapNode)
    register_converter_rules()
    if segmentationNode is None:
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "TSKD segmentation")
        segmentationNode.CreateDefaultDisplayNodes()
    if referenceVolumeNode is not None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        # The labelmap is on the volume's *local* grid: the segmentation must move with the
        # volume (same parent transform), or the prediction lands beside the anatomy.
        follow_transform(segmentationNode, referenceVolumeNode)
    array = slicer.util.arrayFromVolume(labelmapNode)
    present = set(np.unique(array).tolist())
    segmentation = segmentationNode.GetSegmentation()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for c in classes:
        value, cname, color = c["value"], c["name"], c["color"]
        existing = segmentation.GetSegmentIdBySegmentName(cname)
        if existing:
            segment_id = existing
        else:
            segment_id = segmentation.AddEmptySegment("", cname, list(color))
        if value not in present:
            continue
        binary = _oriented_image_from_array((array == value).astype(np.uint8), labelmapNode)
        if not logic.SetBinaryLabelmapToSegment(binary, segmentationNode, segment_id, logic.MODE_REPLACE):
            raise MRMLIOError(f"Could not set segment {cname!r} from the labelmap.")
    return segmentationNode


def _oriented_image_from_array(array: np.ndarray, geometryNode, matrix=None):
    """A ``vtkOrientedImageData`` holding ``array`` ``(K, J, I)`` on ``geometryNode``'s grid
    (``matrix``: that grid's IJK-to-RAS in the target's coordinates, default the node's own)."""
    image = slicer.vtkOrientedImageData()
    k, j, i = array.shape
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    from vtk.util import numpy_support
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    flat[:] = np.ascontiguousarray(array, dtype=np.uint8).ravel()
    image.GetPointData().GetScalars().Modified()
    m = matrix
    if m is None:
        m = vtk.vtkMatrix4x4()
        geometryNode.GetIJKToRASMatrix(m)
    image.SetGeometryFromImageToWorldMatrix(m)
    return image


def import_labelmap_file(path: str, referenceVolumeNode, classes: Sequence[dict],
                         name: str | None = None, segmentationNode=None):
    """Load a backend labelmap file (``.nii.gz``/``.nrrd``) as a segmentation.

    The labelmap is read with its own geometry (it is written on the input image's grid by
    ``tskd segment``), segments get names and colours from ``classes``, the segmentation's
    reference geometry is the reference volume and the node is placed in the same
    subject-hierarchy folder/study as the volume. Returns the segmentation node.
    """
    scene = _scene_of(referenceVolumeNode)
    labelmap = load_volume(scene, path, "TSKD_import_labels", labelmap=True)
    try:
        seg = labelmap_to_segmentation(labelmap, classes, segmentationNode, referenceVolumeNode,
                                       name=name or f"{referenceVolumeNode.GetName()} TSKD")
    finally:
        scene.RemoveNode(labelmap)
    place_next_to(seg, referenceVolumeNode)
    return seg


def place_next_to(node, referenceNode) -> None:
    """Put ``node`` under the same subject-hierarchy parent (study) as ``referenceNode``."""
    scene = _scene_of(referenceNode)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    ref_item = sh.GetItemByDataNode(referenceNode)
    if not ref_item:
        return
    parent = sh.GetItemParent(ref_item) or sh.GetSceneItemID()
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:  # without the application's subject hierarchy plugins nodes get no item by themselves
        sh.CreateItem(parent, node)


# ---------------------------------------------------------------------------------------------
# Single slices (for "segment this slice")
# ---------------------------------------------------------------------------------------------

def extract_slice_volume(volumeNode, axis: int, index: int, name: str | None = None):
    """A new volume node holding one slice of ``volumeNode`` with the exact same physical position.

    ``axis`` is the numpy axis of ``arrayFromVolume`` (0 = k, 1 = j, 2 = i) and ``index`` the
    slice index along it. The slice's IJK-to-RAS keeps directions and spacing; only the origin
    moves to the slice, so voxel ``(0, j, i)`` of the result is voxel ``(index, j, i)`` (for
    axis 0) of the input. Raises :class:`MRMLIOError` if the index is outside the volume.
    """
    scene = _scene_of(volumeNode)
    array = slicer.util.arrayFromVolume(volumeNode)
    if not 0 <= index < array.shape[axis]:
        raise MRMLIOError(f"Slice {index} is outside the volume (0..{array.shape[axis] - 1}).")
    sub = np.take(array, [index], axis=axis).copy()
    ijk = [0, 0, 0]
    ijk[2 - axis] = index  # numpy axis 0 is k (IJK index 2)
    m = ijk_to_ras(volumeNode)
    origin = m @ np.array([*ijk, 1.0])
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or f"{volumeNode.GetName()} slice {index}")
    vm = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vm.SetElement(r, c, m[r, c])
    for r in range(3):
        vm.SetElement(r, 3, origin[r])
    node.SetIJKToRASMatrix(vm)
    slicer.util.updateVolumeFromArray(node, sub)
    return node


def follow_transform(node, referenceNode) -> None:
    """Put ``node`` under the same parent transform as ``referenceNode`` (none if it has none)."""
    node.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())


def volume_grid_in(segmentationNode, volumeNode) -> vtk.vtkMatrix4x4:
    """The volume's IJK-to-RAS expressed in the segmentation's own (local) coordinates.

    Equal to the volume's IJK-to-RAS when both nodes share their parent transform; otherwise
    the linear transform between the two parents is applied. Raises :class:`MRMLIOError` for a
    non-linear transform between them (harden it first).
    """
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    vt, st = volumeNode.GetParentTransformNode(), segmentationNode.GetParentTransformNode()
    if vt is st:
        return m
    between = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(vt, st, between):
        raise MRMLIOError(f"{volumeNode.GetName()!r} and {segmentationNode.GetName()!r} are under "
                          "different non-linear transforms; harden the transforms first.")
    out = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(between, m, out)
    return out


def read_slice(segmentationNode, referenceVolumeNode, axis: int, index: int, segmentIds) -> dict:
    """``{segmentId: 2D uint8 mask}`` of one slice of the reference grid (an undo backup)."""
    out = {}
    for sid in segmentIds:
        full = segments_to_label_array(segmentationNode, [sid], referenceVolumeNode)
        out[sid] = (np.take(full, index, axis=axis) > 0).astype(np.uint8)
    return out


def _replace_slice(segmentationNode, referenceVolumeNode, axis, index, segment_id, mask2d) -> None:
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    full = segments_to_label_array(segmentationNode, [segment_id], referenceVolumeNode)
    full = (full > 0).astype(np.uint8)
    index_slice = [slice(None)] * 3
    index_slice[axis] = index
    full[tuple(index_slice)] = mask2d
    image = _oriented_image_from_array(full, referenceVolumeNode,
                                       volume_grid_in(segmentationNode, referenceVolumeNode))
    if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segment_id, logic.MODE_REPLACE):
        name = segmentationNode.GetSegmentation().GetSegment(segment_id).GetName()
        raise MRMLIOError(f"Could not update segment {name!r} on the slice.")


def write_slice_prediction(segmentationNode, sliceLabels: np.ndarray, referenceVolumeNode,
                           axis: int, index: int, classes: Sequence[dict]) -> dict:
    """Replace the segments of ``classes`` on one slice of ``referenceVolumeNode``'s grid.

    ``sliceLabels`` is the 2D label array of that slice (the slice of a ``(K, J, I)`` array along
    numpy ``axis`` at ``index``, e.g. ``(J, I)`` for axis 0). Voxels on other slices are kept.
    Segments missing from ``segmentationNode`` are created with the class name and colour. Works
    whatever the parent transforms of the two nodes (see :func:`volume_grid_in`).

    Returns the undo backup ``{"axis", "index", "slices": {segmentId: previous 2D mask},
    "created": [segment ids added]}`` for :func:`restore_slice`: the user's edits on that slice
    are never lost. Raises :class:`MRMLIOError` if the shape does not match the slice.
    """
    register_converter_rules()
    dims = referenceVolumeNode.GetImageData().GetDimensions()  # (I, J, K)
    shape = (dims[2], dims[1], dims[0])
    expected = tuple(n for a, n in enumerate(shape) if a != axis)
    sliceLabels = np.asarray(sliceLabels)
    if sliceLabels.shape != expected:
        raise MRMLIOError(f"Slice labels have shape {sliceLabels.shape}, expected {expected}.")
    if not 0 <= index < shape[axis]:
        raise MRMLIOError(f"Slice {index} is outside the volume (0..{shape[axis] - 1}).")
    segmentation = segmentationNode.GetSegmentation()
    ids, created = [], []
    for c in classes:
        segment_id = segmentation.GetSegmentIdBySegmentName(c["name"])
        if not segment_id:
            segment_id = segmentation.AddEmptySegment("", c["name"], list(c["color"]))
            created.append(segment_id)
        ids.append(segment_id)
    backup = {"axis": axis, "index": index, "created": created,
              "slices": read_slice(segmentationNode, referenceVolumeNode, axis, index,
                                   [sid for sid in ids if sid not in created])}
    for c, segment_id in zip(classes, ids):
        _replace_slice(segmentationNode, referenceVolumeNode, axis, index, segment_id,
                       (sliceLabels == c["value"]).astype(np.uint8))
    return backup


def restore_slice(segmentationNode, referenceVolumeNode, backup: dict) -> None:
    """Undo :func:`write_slice_prediction`: put the slice back as it was (segments it created are removed)."""
    segmentation = segmentationNode.GetSegmentation()
    for sid, mask in backup["slices"].items():
        if segmentation.GetSegment(sid) is not None:
            _replace_slice(segmentationNode, referenceVolumeNode, backup["axis"], backup["index"], sid, mask)
    for sid in backup.get("created", []):
        if segmentation.GetSegment(sid) is not None:
            segmentation.RemoveSegment(sid)


# ---------------------------------------------------------------------------------------------
# Predictions vs. the user's labels
# ---------------------------------------------------------------------------------------------

PREDICTION_ATTRIBUTE = "TSKD.Prediction"       # "1" on segmentations written by the model
SOURCE_VOLUME_ATTRIBUTE = "TSKD.SourceVolumeID"  # the volume it was predicted on


def mark_prediction(segmentationNode, volumeNode, modelName: str = "") -> None:
    """Record that ``segmentationNode`` is a model's prediction of ``volumeNode``."""
    segmentationNode.SetAttribute(PREDICTION_ATTRIBUTE, "1")
    segmentationNode.SetAttribute(SOURCE_VOLUME_ATTRIBUTE, volumeNode.GetID() or "")
    if modelName:
        segmentationNode.SetAttribute("TSKD.Model", modelName)


def prediction_segmentation(scene, volumeNode, name: str, modelName: str = ""):
    """The segmentation that receives a model's predictions of ``volumeNode`` (created if needed):
    never the user's label segmentation, under the volume's parent transform, in its study."""
    node = scene.GetFirstNodeByName(name)
    if node is None or not node.IsA("vtkMRMLSegmentationNode") or not is_prediction(node):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        place_next_to(node, volumeNode)
    follow_transform(node, volumeNode)
    mark_prediction(node, volumeNode, modelName)
    return node


def is_prediction(segmentationNode) -> bool:
    return bool(segmentationNode) and segmentationNode.GetAttribute(PREDICTION_ATTRIBUTE) == "1"


def check_training_labels(volumeNode, segmentationNode, checkedSlices) -> None:
    """Refuse label/volume pairs that would train on unchecked or foreign predictions.

    A model's prediction may be used as training labels only on the slices a person checked
    (``checkedSlices``, non-empty) and only with the volume it was predicted on. Raises
    :class:`MRMLIOError` saying what to do.
    """
    if not is_prediction(segmentationNode):
        return
    source = segmentationNode.GetAttribute(SOURCE_VOLUME_ATTRIBUTE)
    if source and volumeNode.GetID() and source != volumeNode.GetID():
        scene = segmentationNode.GetScene()
        other = scene.GetNodeByID(source) if scene is not None else None
        raise MRMLIOError(
            f"{segmentationNode.GetName()!r} is the model's prediction of "
            f"{other.GetName() if other else source!r}, not of {volumeNode.GetName()!r}. "
            "Select the volume it belongs to.")
    if not list(checkedSlices):
        raise MRMLIOError(
            f"{segmentationNode.GetName()!r} is a model prediction: list the slices you checked or "
            "corrected (the \"labelled slices\" field); only those are used for training.")


def slice_index_at(volumeNode, rasWorld, axis: int) -> int:
    """Index along numpy ``axis`` of the slice of ``volumeNode`` through world point ``rasWorld``
    (a slice view's centre), through the volume's parent transform. Raises ``ValueError`` when
    the point is outside the volume."""
    ras = [float(x) for x in rasWorld[:3]]
    transform = volumeNode.GetParentTransformNode()
    if transform is not None:
        worldToLocal = vtk.vtkGeneralTransform()
        transform.GetTransformFromWorld(worldToLocal)
        ras = list(worldToLocal.TransformPoint(ras))
    rasToIjk = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(rasToIjk)
    ijk = rasToIjk.MultiplyPoint([*ras, 1.0])
    index = int(round(ijk[2 - axis]))
    dims = volumeNode.GetImageData().GetDimensions()
    if not 0 <= index < dims[2 - axis]:
        raise ValueError(f"The view shows no slice of {volumeNode.GetName()!r} "
                         f"(slice {index} of 0..{dims[2 - axis] - 1}).")
    return index


def slice_center_ras(volumeNode, axis: int, index: int) -> list[float]:
    """World RAS (mm, through the volume's parent transform) of the centre of slice ``index``
    along numpy ``axis`` of ``volumeNode`` (0 = k, 1 = j, 2 = i): where a slice view must be put
    to show that slice (inverse of :func:`slice_index_at`). Raises ``ValueError`` outside the volume."""
    dims = volumeNode.GetImageData().GetDimensions()
    if not 0 <= int(index) < dims[2 - axis]:
        raise ValueError(f"Slice {index} is outside {volumeNode.GetName()!r} (0..{dims[2 - axis] - 1}).")
    ijk = [(d - 1) / 2.0 for d in dims]
    ijk[2 - axis] = float(index)
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    ras = list(m.MultiplyPoint([*ijk, 1.0])[:3])
    transform = volumeNode.GetParentTransformNode()
    if transform is not None:
        toWorld = vtk.vtkGeneralTransform()
        transform.GetTransformToWorld(toWorld)
        ras = list(toWorld.TransformPoint(ras))
    return ras


def view_shows_axis(volumeNode, sliceToRAS, axis: int, tolerance_deg: float = 10.0) -> bool:
    """True when a slice view (its 4x4 ``SliceToRAS``, world RAS) shows slices along numpy
    ``axis`` of ``volumeNode``: the view normal (third column) is within ``tolerance_deg`` of
    that voxel axis in world coordinates (through a linear parent transform). "Follow" uses it:
    a model slicing axially cannot follow a sagittal view."""
    m = np.asarray([[sliceToRAS.GetElement(r, c) for c in range(4)] for r in range(4)]) \
        if hasattr(sliceToRAS, "GetElement") else np.asarray(sliceToRAS, dtype=float)
    normal = m[:3, 2]
    ijk = ijk_to_ras(volumeNode)
    direction = ijk[:3, 2 - axis]
    transform = volumeNode.GetParentTransformNode()
    if transform is not None:
        toWorld = vtk.vtkMatrix4x4()
        if transform.IsTransformToWorldLinear():
            transform.GetMatrixTransformToWorld(toWorld)
            direction = np.array([[toWorld.GetElement(r, c) for c in range(3)] for r in range(3)]) @ direction
    cos = abs(float(normal @ direction)) / (np.linalg.norm(normal) * np.linalg.norm(direction))
    return cos >= np.cos(np.radians(tolerance_deg))


def choose_slice_view(available: Sequence[str], preferred: str = "Red") -> str:
    """The slice view to read the current slice from: ``preferred`` if the layout has it, else the
    first one. Raises ``ValueError`` when the layout shows no slice view."""
    names = [n for n in available if n]
    if preferred in names:
        return preferred
    if names:
        return names[0]
    raise ValueError("The layout shows no slice view; choose a layout with a slice view.")


def _basename(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def _stem(path: str) -> str:
    return _basename(path)
