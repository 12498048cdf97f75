"""Issue 11 on a real MRML scene (``slicer-core``, no Slicer application): wrong results and lost
edits in a radiologist's first use.

6 segment list built for the current selection; 7 parent transforms; 8 labels drawn in another
plane or with 3D tools; 9 predictions are not the user's labels; 11 "segment this slice" can be
undone; 12 runs folder and "delete run"; 13 layouts without a Red view.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "TSKDSlicer"))

from TSKDSlicerLib import labels, selection, training  # noqa: E402

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed (no vtkMRMLScene)", allow_module_level=True)
sitk = pytest.importorskip("SimpleITK")
import vtk  # noqa: E402

from TSKDSlicerLib import cases, mrml_io  # noqa: E402

SHAPE = (12, 20, 24)  # (K, J, I); spacing 0.8 x 0.8 x 3 mm: axial acquisition, numpy axis 0
LIVER = [{"value": 1, "name": "liver", "color": (0.8, 0.3, 0.2)}]


def _volume(scene, name="ct"):
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    vol.SetSpacing(0.8, 0.8, 3.0)
    vol.SetOrigin(-10.0, 12.0, 30.0)
    rng = np.random.default_rng(0)
    slicer.util.updateVolumeFromArray(vol, rng.integers(-100, 200, SHAPE).astype(np.int16))
    return vol


def _blob():
    k, j, i = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    return (((k - 6) / 4.0) ** 2 + ((j - 10) / 6.0) ** 2 + ((i - 12) / 7.0) ** 2 < 1).astype(np.uint8)


def _segmentation(scene, volume, array, name="labels"):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg.GetSegmentation().AddEmptySegment("Segment_1", "liver", [0.8, 0.3, 0.2])
    image = mrml_io._oriented_image_from_array(array.astype(np.uint8), volume)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(image, seg, "Segment_1", logic.MODE_REPLACE)
    return seg


def _translate(scene, node, mm):
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"shift {mm}")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, mm)
    m.SetElement(1, 3, -mm / 2)
    t.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(t.GetID())
    return t


def _backend_prediction(volume, array, tmp_path):
    """What ``tskd segment`` writes: a labelmap on the input file's grid (volume's local grid)."""
    image_path = mrml_io.write_volume(volume, str(tmp_path / "in.nrrd"))
    ref = sitk.ReadImage(image_path)
    out = sitk.GetImageFromArray(array.astype(np.uint8))
    out.CopyInformation(ref)
    path = str(tmp_path / "pred.nii.gz")
    sitk.WriteImage(out, path)
    return path


# -- 7. parent transforms --------------------------------------------------------------------------

@pytest.mark.parametrize("mm", [5.0, 30.0])
def test_imported_prediction_follows_the_volume_transform(scene, tmp_path, mm):
    vol = _volume(scene)
    _translate(scene, vol, mm)
    pred = _blob()
    seg = mrml_io.import_labelmap_file(_backend_prediction(vol, pred, tmp_path), vol, LIVER)
    assert seg.GetTransformNodeID() == vol.GetTransformNodeID()
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("liver")
    back = mrml_io.segments_to_label_array(seg, [sid], vol)
    assert int(back.sum()) == int(pred.sum()) and np.array_equal(back > 0, pred > 0)


@pytest.mark.parametrize("mm", [5.0, 30.0])
def test_segment_this_slice_under_a_transform(scene, mm):
    vol = _volume(scene)
    _translate(scene, vol, mm)
    axis = cases.slice_axis(vol)
    assert axis == 0
    # the slice a view centred on slice 7 of the (moved) volume shows
    m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(m)
    local = m.MultiplyPoint([12, 10, 7, 1])
    world = [local[0] + mm, local[1] - mm / 2, local[2]]
    assert mrml_io.slice_index_at(vol, world, axis) == 7
    # a user segmentation that is NOT under the volume's transform, and the module's own one
    user = _segmentation(scene, vol, np.zeros(SHAPE, np.uint8), "user")
    user.SetAndObserveTransformNodeID(None)
    predicted = _blob()[7]
    for target in (user, mrml_io.prediction_segmentation(scene, vol, "ct TSKD")):
        mrml_io.write_slice_prediction(target, predicted, vol, axis, 7, LIVER)
        sid = target.GetSegmentation().GetSegmentIdBySegmentName("liver")
        back = mrml_io.segments_to_label_array(target, [sid], vol)
        assert np.array_equal(back[7] > 0, predicted > 0), target.GetName()
        assert back.sum() == predicted.sum()


# -- 11. "segment this slice" keeps an undo state ---------------------------------------------------

def test_segment_this_slice_can_be_undone(scene):
    vol = _volume(scene)
    drawn = np.zeros(SHAPE, np.uint8)
    drawn[5, 3:9, 4:15] = 1  # the radiologist's edit on slice 5
    drawn[8, 5:7, 5:7] = 1
    seg = _segmentation(scene, vol, drawn)
    before = mrml_io.segments_to_label_array(seg, ["Segment_1"], vol)
    backup = mrml_io.write_slice_prediction(seg, _blob()[5], vol, 0, 5,
                                            LIVER + [{"value": 2, "name": "spleen", "color": (0, 1, 0)}])
    changed = mrml_io.segments_to_label_array(seg, ["Segment_1"], vol)
    assert not np.array_equal(changed, before) and np.array_equal(changed[8], before[8])
    assert seg.GetSegmentation().GetSegmentIdBySegmentName("spleen")
    mrml_io.restore_slice(seg, vol, backup)
    assert np.array_equal(mrml_io.segments_to_label_array(seg, ["Segment_1"], vol), before)
    assert not seg.GetSegmentation().GetSegmentIdBySegmentName("spleen")


# -- 8. labels drawn in another plane or with 3D tools ---------------------------------------------

def test_axial_drawing_passes(scene):
    arr = np.zeros(SHAPE, np.uint8)
    arr[[3, 8]] = _blob()[[6, 6]]
    assert labels.label_plane_problems(arr, 0) == []


def test_sagittal_drawing_is_caught(scene, tmp_path):
    vol = _volume(scene)
    arr = np.zeros(SHAPE, np.uint8)
    arr[:, :, [10, 14]] = _blob()[:, :, [12, 12]]  # two sagittal slices
    problems = labels.label_plane_problems(arr, 0, cases.axis_names(vol))
    assert problems and "sagittal" in problems[0] and "axial" in problems[0]
    seg = _segmentation(scene, vol, arr)
    with pytest.raises(cases.LabelPlaneWarning, match="sagittal"):
        cases.prepare_training_request([(vol, seg, ["Segment_1"], [])], str(tmp_path / "run"))
    req = cases.prepare_training_request([(vol, seg, ["Segment_1"], [])], str(tmp_path / "run2"),
                                         accept_label_warnings=True)  # the user confirmed
    assert req.images


def test_3d_tool_labels_are_caught(scene, tmp_path):
    vol = _volume(scene)
    seg = _segmentation(scene, vol, _blob())  # a threshold / grow-from-seeds result: 7 slices
    with pytest.raises(cases.LabelPlaneWarning, match="consecutive"):
        cases.prepare_training_request([(vol, seg, ["Segment_1"], [])], str(tmp_path / "run"))


# -- 9. a prediction is not the user's labels ---------------------------------------------------------

def test_prediction_needs_checked_slices_and_its_own_volume(scene, tmp_path):
    vol_a, vol_b = _volume(scene, "A"), _volume(scene, "B")
    pred_b = mrml_io.import_labelmap_file(_backend_prediction(vol_b, _blob(), tmp_path), vol_b, LIVER)
    mrml_io.mark_prediction(pred_b, vol_b, "tiny")
    sid = pred_b.GetSegmentation().GetSegmentIdBySegmentName("liver")
    assert mrml_io.is_prediction(pred_b)
    with pytest.raises(mrml_io.MRMLIOError, match="prediction of 'B'"):
        cases.prepare_training_request([(vol_a, pred_b, [sid], [5])], str(tmp_path / "r1"))
    with pytest.raises(mrml_io.MRMLIOError, match="slices you checked"):
        cases.prepare_training_request([(vol_b, pred_b, [sid], [])], str(tmp_path / "r2"))
    req = cases.prepare_training_request([(vol_b, pred_b, [sid], [5, 6])], str(tmp_path / "r3"))
    assert req.labelled_slices == ["5-6"]  # not every predicted slice
    # the user's own labels are unaffected
    user = _segmentation(scene, vol_a, np.pad(_blob()[[6]], ((4, 7), (0, 0), (0, 0))))
    req = cases.prepare_training_request([(vol_a, user, ["Segment_1"], [])], str(tmp_path / "r4"))
    assert req.labelled_slices == []  # backend default: the slice holding labels


def test_prediction_segmentation_is_marked_and_placed(scene):
    vol = _volume(scene)
    _translate(scene, vol, 5.0)
    seg = mrml_io.prediction_segmentation(scene, vol, "ct TSKD", modelName="tiny")
    assert mrml_io.is_prediction(seg) and seg.GetTransformNodeID() == vol.GetTransformNodeID()
    assert mrml_io.prediction_segmentation(scene, vol, "ct TSKD") is seg  # reused, not duplicated


# -- 6. segment list of the current selection ----------------------------------------------------------

def test_segment_rows_come_from_the_given_nodes(scene):
    vol = _volume(scene)
    seg_a = _segmentation(scene, vol, _blob(), "A")
    seg_b = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "B")
    seg_b.GetSegmentation().AddEmptySegment("Segment_1", "spleen", [0, 1, 0])
    seg_b.GetSegmentation().AddEmptySegment("Segment_2", "kidney", [0, 0, 1])
    sel = selection.SegmentSelection()
    rows = sel.rows(vol, seg_a, {"Segment_1": 7})
    sel.remember_checks(seg_a, [], ["Segment_1"])  # the user unchecks liver in A
    assert sel.needs_update(vol, seg_b) and not sel.needs_update(vol, seg_a)
    rows = sel.rows(vol, seg_b, {})
    assert [r.name for r in rows] == ["spleen", "kidney"] and all(r.checked for r in rows)
    assert [r.checked for r in sel.rows(vol, seg_a, {})] == [False]
    seg_b.GetSegmentation().AddEmptySegment("Segment_3", "aorta", [1, 1, 0])
    assert sel.needs_update(vol, seg_b)  # segments added: rebuilt
    assert selection.SegmentSelection.valid_ids(seg_a, ["Segment_1", "Segment_2"]) == ["Segment_1"]


def test_widget_does_not_rebuild_the_list_from_selector_signals():
    src = open(os.path.join(ROOT, "TSKDSlicer", "TSKDSlicer.py"), encoding="utf-8").read()
    for line in src.splitlines():
        if "currentNodeChanged" in line:
            assert "updateSegmentList" not in line, line


# -- 12. runs folder and "delete run" -------------------------------------------------------------------

def test_runs_go_to_the_cache_and_can_be_deleted(tmp_path):
    runs = training.default_runs_dir(str(tmp_path / "cache"))
    assert runs.startswith(str(tmp_path / "cache"))
    run = os.path.join(runs, "20261130-120000_liver")
    os.makedirs(os.path.join(run, "model"))
    open(os.path.join(run, "request.json"), "w").write("{}")
    open(os.path.join(run, "model", "student.bin"), "wb").write(b"x" * 1000)
    library = tmp_path / "settings" / "TSKD" / "models" / "liver"
    library.mkdir(parents=True)
    (library / "model_card.json").write_text(json.dumps({"format": "tskd-model"}))
    with pytest.raises(RuntimeError, match="still running"):
        training.delete_run(runs, run, running=[run])
    with pytest.raises(ValueError):
        training.delete_run(runs, str(library), running=[])
    with pytest.raises(ValueError):
        training.delete_run(runs, runs, running=[])
    assert training.delete_run(runs, run) >= 1000
    assert not os.path.exists(run) and (library / "model_card.json").is_file()


# -- 13. layouts without a Red view; scene closed during training -------------------------------------

def test_slice_view_choice():
    assert mrml_io.choose_slice_view(["Red", "Yellow"]) == "Red"
    assert mrml_io.choose_slice_view(["Yellow", "Green"]) == "Yellow"
    with pytest.raises(ValueError, match="no slice view"):
        mrml_io.choose_slice_view([])


def test_job_end_after_scene_close_is_guarded():
    import ast
    src = open(os.path.join(ROOT, "TSKDSlicer", "TSKDSlicer.py"), encoding="utf-8").read()
    fn = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "_onJobFinished")
    body = ast.get_source_segment(src, fn)
    assert "self._parameterNode is not None" in body or "if self._parameterNode" in body
    fn = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "currentSliceIndex")
    assert "choose_slice_view" in ast.get_source_segment(src, fn)
    assert 'sliceWidget("Red")' not in src
