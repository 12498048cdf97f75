"""Real-MRML tests of the Slicer module's glue (TSKDSlicerLib.mrml_io), run without the Slicer app.

Kitware's ``slicer-core`` wheel gives a real ``vtkMRMLScene``, storage nodes and the segmentations
logic. The tests load the bundled TotalSegmentator CT and its segmentation, give the volume an
anisotropic spacing, a non-zero origin and an oblique, flipped direction, draw a *partial*
segmentation (some slices only) and check that every label lands on the voxel it came from, in
both directions (Slicer -> backend files -> Slicer).
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DATA = os.path.join(ROOT, "Testing", "Data", "totalseg")
sys.path.insert(0, os.path.join(ROOT, "TSKDSlicer"))

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed (no vtkMRMLScene)", allow_module_level=True)
sitk = pytest.importorskip("SimpleITK")
import vtk  # noqa: E402

from TSKDSlicerLib import mrml_io  # noqa: E402
from TSKDSlicerLib.labels import labelled_slices, slice_axis_for  # noqa: E402

CLASSES = {5: "liver", 1: "spleen", 2: "kidney_right"}


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    z, x = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx @ np.diag([-1.0, 1.0, 1.0])  # a flip as well: not a pure rotation


def _set_geometry(node, spacing, origin, direction):
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, direction[r, c])
    node.SetIJKToRASDirectionMatrix(m)


@pytest.fixture()
def scene():
    mrml_io.register_converter_rules()
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture()
def case(scene):
    """CT volume with odd geometry + a segmentation holding labels on a few slices only."""
    volume = mrml_io.load_volume(scene, os.path.join(DATA, "example_ct_sm.nii.gz"), "ct")
    direction = _rotation(25.0, -12.0)
    spacing, origin = (0.8, 1.3, 3.7), (-41.5, 17.25, 203.0)
    _set_geometry(volume, spacing, origin, direction)

    seg_full = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(DATA, "example_seg.nii.gz")))
    partial = np.zeros_like(seg_full)
    labelled = [4, 11, 12, 20]
    for k in labelled:
        for value in CLASSES:
            partial[k][seg_full[k] == value] = value
    assert all(partial[k].any() for k in labelled)

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "drawn")
    _set_geometry(labelmap, spacing, origin, direction)
    slicer.util.updateVolumeFromArray(labelmap, partial)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "partial labels")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    ids = {}
    seg = segmentation.GetSegmentation()
    for n in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(n)
        ids[int(seg.GetSegment(sid).GetLabelValue())] = sid
    for value, name in CLASSES.items():
        seg.GetSegment(ids[value]).SetName(name)
    return {"volume": volume, "segmentation": segmentation, "partial": partial, "ids": ids,
            "labelled": labelled, "spacing": spacing, "origin": origin, "direction": direction}


def _lps(v):
    return np.array([-v[0], -v[1], v[2]])


def test_export_training_inputs_voxel_exact(case, tmp_path):
    ids = case["ids"]
    order = [5, 2, 1]  # the user's order: liver, kidney_right, spleen -> values 1, 2, 3
    out = mrml_io.export_training_inputs(case["volume"], case["segmentation"],
                                         [ids[v] for v in order], str(tmp_path))
    assert out["classes"] == {"1": "liver", "2": "kidney_right", "3": "spleen"}
    records = json.load(open(out["class_map"]))["classes"]
    assert [(c["value"], c["name"]) for c in records] == [(1, "liver"), (2, "kidney_right"), (3, "spleen")]
    assert out["class_map"].endswith("labels.json") and all(len(c["color"]) == 3 for c in records)

    image = sitk.ReadImage(out["image"])
    labels = sitk.ReadImage(out["labels"])
    # Image: same voxels, geometry in LPS.
    ct = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(DATA, "example_ct_sm.nii.gz")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct)
    np.testing.assert_allclose(image.GetSpacing(), case["spacing"], atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), _lps(case["origin"]), atol=1e-4)
    flip = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), flip @ case["direction"], atol=1e-5)
    # Labels: on the image grid, every label on the voxel it was drawn on.
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(labels, attr)(), getattr(image, attr)(), atol=1e-5)
    expected = np.zeros_like(case["partial"])
    for new, old in enumerate(order, start=1):
        expected[case["partial"] == old] = new
    got = sitk.GetArrayFromImage(labels)
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(out["array"], expected)
    # Labelled slices found from the exported array are the drawn ones.
    axis = slice_axis_for(mrml_io.ijk_to_ras(case["volume"])[:3, :3], "axial")
    assert labelled_slices(got, 0) == case["labelled"]
    assert axis in (0, 1, 2)


def test_import_labelmap_voxel_exact_names_colours_and_study(scene, case, tmp_path):
    volume = case["volume"]
    # A "prediction" written by the backend on the input image's grid (LPS file).
    image_path = mrml_io.write_volume(volume, str(tmp_path / "image.nrrd"))
    ref = sitk.ReadImage(image_path)
    pred = np.zeros(sitk.GetArrayViewFromImage(ref).shape, np.uint8)
    full = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(DATA, "example_seg.nii.gz")))
    pred[full == 5] = 6   # backend label values are the card's `value`
    pred[full == 1] = 9
    out = sitk.GetImageFromArray(pred)
    out.CopyInformation(ref)
    sitk.WriteImage(out, str(tmp_path / "pred.nii.gz"))
    card = {"classes": [{"index": 1, "value": 6, "name": "liver", "color": [200, 100, 50]},
                        {"index": 2, "value": 9, "name": "spleen", "color": [0.1, 0.9, 0.2]},
                        {"index": 3, "value": 11, "name": "absent", "color": [1, 2, 3]}]}

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    if sh.GetItemByDataNode(volume):
        sh.SetItemParent(sh.GetItemByDataNode(volume), study)
    else:  # slicer-core has no subject hierarchy plugins that add items for new nodes
        sh.CreateItem(study, volume)

    seg = mrml_io.import_labelmap_file(str(tmp_path / "pred.nii.gz"), volume,
                                       mrml_io.classes_from_card(card), name="result")
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(n)).GetName()
             for n in range(segmentation.GetNumberOfSegments())]
    assert names == ["liver", "spleen", "absent"]
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    np.testing.assert_allclose(liver.GetColor(), (200 / 255, 100 / 255, 50 / 255), atol=1e-6)
    # Back to a labelmap on the volume grid: the voxels are exactly the predicted ones.
    ids = [segmentation.GetSegmentIdBySegmentName(n) for n in ("liver", "spleen", "absent")]
    back = mrml_io.segments_to_label_array(seg, ids, volume)
    expected = np.zeros_like(pred)
    expected[pred == 6] = 1
    expected[pred == 9] = 2
    np.testing.assert_array_equal(back, expected)
    # And in physical space: a liver voxel's RAS centre is inside the liver segment.
    k, j, i = np.argwhere(pred == 6)[len(np.argwhere(pred == 6)) // 2]
    ras = mrml_io.ijk_to_ras(volume) @ np.array([i, j, k, 1.0])
    internal = slicer.vtkOrientedImageData()
    seg.GetBinaryLabelmapRepresentation(ids[0], internal)
    m = vtk.vtkMatrix4x4()
    internal.GetWorldToImageMatrix(m)
    ijk = [m.MultiplyPoint([*ras[:3], 1.0])[c] for c in range(3)]
    assert internal.GetScalarComponentAsDouble(*[int(round(c)) for c in ijk], 0) == 1


def test_extract_slice_and_write_slice_prediction(scene, case):
    volume = case["volume"]
    k = 12
    sl = mrml_io.extract_slice_volume(volume, 0, k)
    arr = slicer.util.arrayFromVolume(volume)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(sl)[0], arr[k])
    np.testing.assert_allclose(mrml_io.ijk_to_ras(sl) @ [3, 4, 0, 1],
                               mrml_io.ijk_to_ras(volume) @ [3, 4, k, 1], atol=1e-6)
    # A one-slice prediction replaces that slice only.
    seg = case["segmentation"]
    classes = [{"value": 3, "name": "liver", "color": (1, 0, 0)}]
    before = mrml_io.segments_to_label_array(seg, [case["ids"][5]], volume)
    pred = (case["partial"][k] == 5).astype(np.uint8) * 3
    mrml_io.write_slice_prediction(seg, pred, volume, 0, k, classes)
    after = mrml_io.segments_to_label_array(seg, [case["ids"][5]], volume)
    np.testing.assert_array_equal(after, before)  # same labels put back on the same slice
    # An empty prediction clears that slice only.
    mrml_io.write_slice_prediction(seg, np.zeros_like(pred), volume, 0, k, classes)
    cleared = mrml_io.segments_to_label_array(seg, [case["ids"][5]], volume)
    assert not cleared[k].any()
    other = [s for s in range(cleared.shape[0]) if s != k]
    np.testing.assert_array_equal(cleared[other], before[other])
    # A new slice (unlabelled before) along another axis.
    j = 50
    row = np.zeros((before.shape[0], before.shape[2]), np.uint8)
    row[5:9, 10:30] = 3
    mrml_io.write_slice_prediction(seg, row, volume, 1, j, classes)
    now = mrml_io.segments_to_label_array(seg, [case["ids"][5]], volume)
    np.testing.assert_array_equal(now[:, j, :], (row == 3).astype(now.dtype))  # slice replaced
    mask = np.ones(now.shape, bool)
    mask[:, j, :] = False
    np.testing.assert_array_equal(now[mask], cleared[mask])


def test_dicom_series_roundtrip(scene, tmp_path):
    """The bundled DICOM series (loaded with Slicer's archetype reader) survives export/import."""
    files = sorted(glob.glob(os.path.join(DATA, "ct_dicom", "*")))
    if not files:
        pytest.skip("no DICOM series bundled")
    volume = mrml_io.load_volume(scene, files[0], "dicom ct")
    array = slicer.util.arrayFromVolume(volume)
    assert array.shape[0] == len(files)
    # Labels drawn on two slices of the DICOM grid, taken from the bundled segmentation where
    # it shares the grid, else a block.
    seg_img = sitk.ReadImage(os.path.join(DATA, "example_seg_dicom.nii.gz"))
    labels = np.zeros(array.shape, np.uint8)
    seg_arr = sitk.GetArrayFromImage(seg_img)
    if seg_arr.shape == array.shape and np.allclose(seg_img.GetOrigin(), _lps(volume.GetOrigin()), atol=1e-3):
        labels[[3, 15]] = (seg_arr[[3, 15]] > 0)
    if not labels.any():
        labels[3, 100:180, 200:260] = 1
        labels[15, 300:320, 40:90] = 1
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(labelmap, labels)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "dicom labels")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    sid = segmentation.GetSegmentation().GetNthSegmentID(0)
    out = mrml_io.export_training_inputs(volume, segmentation, [sid], str(tmp_path), labelsName="l.nrrd")
    image = sitk.ReadImage(out["image"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    np.testing.assert_allclose(image.GetOrigin(), _lps(volume.GetOrigin()), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(out["labels"])), labels)
    assert labelled_slices(out["array"], 0) == [3, 15]
    # The labels file read back as a "prediction" lands on the same voxels.
    node = mrml_io.import_labelmap_file(out["labels"], volume, [{"value": 1, "name": "organ",
                                                                 "color": (1, 0, 0)}])
    back = mrml_io.segments_to_label_array(node, [node.GetSegmentation().GetNthSegmentID(0)], volume)
    np.testing.assert_array_equal(back, labels)
