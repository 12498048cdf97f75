"""Issue 13: in-process interactive segmentation (the Segment Editor effect "TSKD") on a real MRML
scene (``slicer-core``, no Slicer application) with a real exported student (ONNX) and the bundled
real CT/MR/ultrasound data.

The effect's logic is plain classes (``TSKDSlicerLib.interactive``) and MRML glue
(``TSKDSlicerLib.inprocess``); the Qt part (``SegmentEditorTSKD``) is only checked in Slicer.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "TSKDSlicer"))

from TSKDSlicerLib import interactive, models  # noqa: E402
from TSKDSlicerLib.interactive import (CorrectionTracker, FollowController, InteractiveError,  # noqa: E402
                                       Masking, apply_masking, evenly_spaced, rank_slices)

DATA = os.path.join(ROOT, "Testing", "Data")
CT = os.path.join(DATA, "totalseg", "example_ct_sm.nii.gz")
MR = os.path.join(DATA, "totalseg", "example_mr_sm.nii.gz")
US = os.path.join(DATA, "hc18", "images", "000_HC.png")


# ------------------------------------------------------------------------------------------------
# Plain logic (no MRML)
# ------------------------------------------------------------------------------------------------
def test_follow_debounces_and_never_touches_protected_slices():
    now = [0.0]
    protected = {5}
    f = FollowController(lambda: protected, delay_s=0.3, clock=lambda: now[0])
    f.shown("Red", 4)
    assert f.due() == []  # follow is off
    f.enabled = True
    for s in (3, 4, 5):  # scrolling: each change restarts the debounce
        f.shown("Red", s)
        now[0] += 0.1
    assert f.due() == []
    now[0] += 0.3
    assert f.due() == []  # the view rests on 5: the user's slice, never segmented
    f.shown("Red", 6)
    f.shown("Yellow", 2)
    now[0] += 0.31
    assert sorted(f.due()) == [2, 6]
    f.shown("Red", 6)
    now[0] += 1
    assert f.due() == []  # each slice once
    protected.add(7)
    f.shown("Green", 7)
    now[0] += 1
    assert f.due() == []


def test_masking_rules():
    z = np.zeros((4, 4), bool)
    pred = z.copy()
    pred[:, :2] = True
    other = z.copy()
    other[0, :] = True
    mine = z.copy()
    mine[3, 3] = True
    cur = {"liver": mine, "spleen": other}
    out = apply_masking({"liver": pred}, cur)  # everywhere, overwrite all
    assert np.array_equal(out["liver"], pred) and not out["spleen"][0, :2].any() and out["spleen"][0, 2:].all()
    out = apply_masking({"liver": pred}, cur, Masking(overwrite="none"))
    assert not out["liver"][0].any() and out["liver"][1:, :2].all() and out["liver"][3, 3] == 0 and "spleen" not in out
    out = apply_masking({"liver": pred}, cur, Masking(editable="outside_all", overwrite="all"))
    assert not out["liver"][0].any() and "spleen" not in out
    out = apply_masking({"liver": pred}, cur, Masking(editable="inside_segment", mask_segment="spleen"))
    assert np.array_equal(out["liver"][0], [True, True, False, False]) and out["liver"][3, 3]  # kept outside the area
    out = apply_masking({"liver": pred}, cur, Masking(overwrite="visible"), visible=["liver"])
    assert "spleen" not in out and not out["liver"][0].any()  # hidden segment: neither overwritten nor overwritten by
    inten = np.arange(16).reshape(4, 4)
    out = apply_masking({"liver": pred}, {"liver": z}, Masking(intensity_range=(4, 9)), intensities=inten)
    assert out["liver"].sum() == 4 and out["liver"][1:3, :2].all()
    with pytest.raises(InteractiveError, match="inside a segment"):
        apply_masking({"liver": pred}, cur, Masking(editable="inside_segment", mask_segment="gone"))


def test_rank_and_evenly_spaced():
    scores = {s: float(v) for s, v in enumerate([0.1, 0.9, 0.85, 0.2, 0.8, 0.3, 0.7, 0.05])}
    assert rank_slices(scores, labelled=[], count=3, min_gap=2) == [1, 4, 6]
    assert rank_slices(scores, labelled=[4], count=2, min_gap=2) == [1, 6]
    assert rank_slices(scores, labelled=[], count=2, min_gap=1) == [1, 2]
    assert evenly_spaced(10, labelled=[], count=3) == [2, 4, 7]
    assert all(s not in (2, 4) for s in evenly_spaced(10, labelled=[2, 4], count=3))
    assert interactive.range_between_labelled([7, 3, 12], 20) == (3, 12)
    with pytest.raises(InteractiveError, match="No slice"):
        interactive.range_between_labelled([], 20)


def test_match_segments_mismatch_is_one_clear_error():
    with pytest.raises(InteractiveError) as e:
        interactive.match_segments(["liver", "spleen"], {"S1": "tumour"}, ["S1"], "abdomen", "labels")
    msg = str(e.value)
    assert "'abdomen'" in msg and "tumour" in msg and "liver" in msg and "nothing was written" in msg
    assert interactive.match_segments(["liver", "spleen"], {"a": "Spleen", "b": "x"}, None) == {"a": 2}


def test_correction_tracker_packs_and_compares():
    t = CorrectionTracker()
    m = np.zeros((5, 6), bool)
    m[1:3, 2:4] = True
    t.note_user_labels([0])
    t.record_prediction(3, {"liver": m})
    assert t.refresh(lambda s: {3: {"liver": m.copy()}}) == set()
    edited = m.copy()
    edited[4, 5] = True
    assert t.refresh(lambda s: {3: {"liver": edited}}, labelled_now=[0, 3, 8]) == {3}
    assert t.training_slices() == [0, 3, 8] and 3 in t.protected()


# ------------------------------------------------------------------------------------------------
# Real model package and MRML scene
# ------------------------------------------------------------------------------------------------
slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed (no vtkMRMLScene)", allow_module_level=True)
sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("onnxruntime")
import vtk  # noqa: E402

from TSKDSlicerLib import inprocess, mrml_io  # noqa: E402


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """An untrained 64-px U-Net student (liver, spleen), exported as a real model package."""
    torch = pytest.importorskip("torch")
    from TSKDLib.data.classmap import ClassMap
    from TSKDLib.deploy.export import export_model_package
    from TSKDLib.data.preprocess import Normalization
    from TSKDLib.distillation.student import build_student

    torch.manual_seed(3)
    model = build_student("unet-s", num_classes=2, input_size=64)
    with torch.no_grad():  # a visible mix of classes from an untrained net
        last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.bias.copy_(torch.tensor([0.0, 0.05, -0.05]))
    out = tmp_path_factory.mktemp("pkg") / "abdomen"
    norm = dict(Normalization.preset("ct").__dict__)
    export_model_package(model, out, ClassMap.from_dict({"5": "liver", "1": "spleen"}), norm,
                         torchscript=False, name="abdomen")
    return str(out)


def _labels_node(scene, vol, name="labels", segments=()):
    """A segmentation node on ``vol``'s grid with empty segments ``(name, rgb)``; returns
    ``(node, [segment ids])``."""
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    return seg, [seg.GetSegmentation().AddEmptySegment("", n, list(c)) for n, c in segments]


@pytest.fixture(scope="module")
def segmenter():
    return inprocess.InteractiveSegmenter(interactive.ModelSessionCache(threads=1))


def _oblique_volume(scene, path=CT, angle_deg=20.0):
    """A real scan placed obliquely (rotated direction, anisotropic spacing) under a rotating and
    translating parent transform."""
    vol = mrml_io.load_volume(scene, path, "ct")
    m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(m)
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot = rot @ np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    cols = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)]) @ np.diag([0.4, 0.45, 1.0])  # 1.2 x 1.35 x 3 mm
    new = rot @ cols
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, new[r, c])
    vol.SetIJKToRASMatrix(m)
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    tm = vtk.vtkMatrix4x4()
    b = np.radians(15)
    tm.SetElement(0, 0, np.cos(b))
    tm.SetElement(0, 1, -np.sin(b))
    tm.SetElement(1, 0, np.sin(b))
    tm.SetElement(1, 1, np.cos(b))
    tm.SetElement(0, 3, 12.0)
    tm.SetElement(2, 3, -7.5)
    t.SetMatrixTransformToParent(tm)
    vol.SetAndObserveTransformNodeID(t.GetID())
    return vol


NAMES = ("spleen", "liver")  # the model's class order (class map sorted by label value: 1 spleen, 5 liver)


def _labels(seg, vol, names=NAMES):
    s = seg.GetSegmentation()
    out = np.zeros(tuple(reversed(vol.GetImageData().GetDimensions())), np.uint8)
    for k, name in enumerate(names, start=1):
        sid = s.GetSegmentIdBySegmentName(name)
        if sid:
            out[mrml_io.segments_to_label_array(seg, [sid], vol) > 0] = k
    return out


def _tskd_segment(package, vol, tmp_path):
    """``tskd segment`` on the file the module writes for this volume (its own voxel grid)."""
    from TSKDLib.deploy.inference import segment_image

    path = mrml_io.write_volume(vol, str(tmp_path / "vol.nrrd"))
    return sitk.GetArrayFromImage(segment_image(package, path))


@pytest.mark.parametrize("under_transform", [False, True], ids=["segmentation-outside", "segmentation-under"])
def test_one_slice_equals_tskd_segment_oblique_anisotropic_under_transform(scene, package, segmenter, tmp_path,
                                                                          under_transform):
    vol = _oblique_volume(scene)
    assert vol.GetSpacing()[2] > 2 * vol.GetSpacing()[0]  # anisotropic: 3 mm slices
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    if under_transform:
        seg.SetAndObserveTransformNodeID(vol.GetTransformNodeID())
    ref = _tskd_segment(package, vol, tmp_path)
    axis = segmenter.predictor(vol, package).axis
    assert axis == 0 and tuple(segmenter.package(package).class_map.names) == NAMES
    s = 17
    assert len(np.unique(ref[s])) == 3, "the fixture model must predict both classes on this slice"
    report = segmenter.segment(vol, seg, package, [s])
    assert report["slices"] == [s]
    got = _labels(seg, vol)
    np.testing.assert_array_equal(got[s], ref[s])
    assert not got[np.arange(got.shape[0]) != s].any()  # nothing written elsewhere
    # a range in chunks equals the whole-volume run on every slice of the range
    segmenter.segment(vol, seg, package, range(3, 12), chunk=4)
    got = _labels(seg, vol)
    np.testing.assert_array_equal(got[3:12], ref[3:12])


def test_whole_volume_progress_cancel_and_undo(scene, package, segmenter, tmp_path):
    vol = mrml_io.load_volume(scene, CT, "ct")
    seg, _ = _labels_node(scene, vol, "pred")
    n = vol.GetImageData().GetDimensions()[2]
    seen = []
    report = segmenter.segment(vol, seg, package, range(n), chunk=8, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (n, n) and len(seen) == -(-n // 8)
    np.testing.assert_array_equal(_labels(seg, vol), _tskd_segment(package, vol, tmp_path))
    assert report["slices"] == list(range(n))
    # Cancel after the first chunk: that chunk stays, the rest is untouched, and undo restores
    seg2, _ = _labels_node(scene, vol, "pred2")
    calls = []
    with pytest.raises(interactive.Cancelled):
        segmenter.segment(vol, seg2, package, range(n), chunk=8, cancelled=lambda: calls.append(1) or len(calls) > 1)
    part = _labels(seg2, vol)
    assert part[:8].any() and not part[8:].any()
    assert segmenter.undo(seg2, vol) is not None
    assert seg2.GetSegmentation().GetNumberOfSegments() == 0  # the segments it created are gone too


def test_whole_volume_with_cleanup_equals_tskd_segment_and_cancel_writes_nothing(scene, package, segmenter,
                                                                                 tmp_path):
    """The effect's Whole volume (logic.segmentWholeVolume) cleans in 3D like ``tskd segment``:
    oblique anisotropic volume under a transform, both classes one-object (a strong clean-up)."""
    from TSKDLib.deploy.inference import Cleanup, segment_image

    vol = _oblique_volume(scene)
    clean = Cleanup.segment_default(single_object=(1, 2))
    path = mrml_io.write_volume(vol, str(tmp_path / "vol.nrrd"))
    ref = sitk.GetArrayFromImage(segment_image(package, path, cleanup=clean))
    raw = sitk.GetArrayFromImage(segment_image(package, path))
    assert np.count_nonzero(ref != raw) > 100, "the clean-up must change this model's labels"
    n = segmenter.predictor(vol, package).num_slices
    seg, _ = _labels_node(scene, vol, "cleaned")
    seen = []
    report = segmenter.segment(vol, seg, package, range(n), chunk=8, cleanup=clean,
                               progress=lambda d, t: seen.append((d, t)))
    assert report["slices"] == list(range(n)) and seen[-1] == (n, n)
    np.testing.assert_array_equal(_labels(seg, vol), ref)
    # The one-object parts judged by where they lie (LPS, through the volume's oblique geometry
    # and parent transform): every part kept by size, then only the best-placed part of each class
    placed = Cleanup.segment_default(single_object=(1, 2), single_object_fraction=0.0,
                                     locations={1: (-1000.0, 0.0), 2: (0.0, 1000.0)}, location_margin_mm=1.0)
    ref_placed = sitk.GetArrayFromImage(segment_image(package, path, cleanup=placed))
    by_size = sitk.GetArrayFromImage(segment_image(package, path, cleanup=Cleanup.segment_default(
        single_object=(1, 2), single_object_fraction=0.0)))
    assert np.count_nonzero(ref_placed != by_size) > 100, "the location rule must change this model's labels"
    seg3, _ = _labels_node(scene, vol, "placed")
    segmenter.segment(vol, seg3, package, range(n), chunk=8, cleanup=placed)
    np.testing.assert_array_equal(_labels(seg3, vol), ref_placed)
    # Cancel during the predictions: nothing written, the segments it created are gone, no undo state
    seg2, _ = _labels_node(scene, vol, "cancelled")
    calls = []
    depth = len(segmenter.undoStack(seg2))
    with pytest.raises(interactive.Cancelled) as info:
        segmenter.segment(vol, seg2, package, range(n), chunk=8, cleanup=clean,
                          cancelled=lambda: calls.append(1) or len(calls) > 1)
    assert info.value.kept is False
    assert seg2.GetSegmentation().GetNumberOfSegments() == 0
    assert len(segmenter.undoStack(seg2)) == depth


def test_intensity_standardisation_in_process_equals_tskd_segment(scene, package, segmenter, tmp_path):
    """An MR model whose card records its training scans' class intensities segments a scan
    whose classes come out darker a second time, scaled (``tskd segment``); the module's
    in-process segmentation (Whole volume and single slices) finds the same factor and labels,
    on an oblique, anisotropic MR volume under a transform."""
    import dataclasses
    import json
    import shutil

    from TSKDLib.deploy.inference import Cleanup, load_model_package, segment_image

    mr_model = tmp_path / "mr_model"
    shutil.copytree(package, mr_model)
    card = json.loads((mr_model / "model_card.json").read_text())
    card["normalization"] = {"kind": "percentile", "low": 0.5, "high": 99.5, "width": 400.0, "level": 40.0,
                             "standardize": {"class_medians": [{"liver": 0.9, "spleen": 0.9}], "tolerance": 1.1}}
    (mr_model / "model_card.json").write_text(json.dumps(card))
    pkg = load_model_package(mr_model)
    plain = dataclasses.replace(pkg, normalization={k: v for k, v in pkg.normalization.items() if k != "standardize"})
    vol = _oblique_volume(scene, path=MR)
    path = mrml_io.write_volume(vol, str(tmp_path / "mr.nrrd"))
    clean = Cleanup.segment_default(single_object=(1, 2))
    found: dict = {}
    ref = sitk.GetArrayFromImage(segment_image(pkg, path, cleanup=clean, review=found))
    assert found["intensity_factor"] > 1.1, "this reference must trigger the second pass"
    assert np.count_nonzero(ref != sitk.GetArrayFromImage(segment_image(plain, path, cleanup=clean))) > 100
    n = segmenter.predictor(vol, str(mr_model)).num_slices
    seg, _ = _labels_node(scene, vol, "standardised")
    segmenter.segment(vol, seg, str(mr_model), range(n), chunk=8, cleanup=clean)
    np.testing.assert_array_equal(_labels(seg, vol), ref)
    assert segmenter.predictor(vol, str(mr_model)).intensity_factor == pytest.approx(found["intensity_factor"])
    raw = sitk.GetArrayFromImage(segment_image(pkg, path))  # one slice, no clean-up: same labels
    fresh = inprocess.InteractiveSegmenter(interactive.ModelSessionCache(threads=1))  # first use: finds the factor
    seg2, _ = _labels_node(scene, vol, "one slice")
    fresh.segment(vol, seg2, str(mr_model), [9])
    np.testing.assert_array_equal(_labels(seg2, vol)[9], raw[9])


def test_undo_restores_the_users_labels(scene, package, segmenter):
    vol = mrml_io.load_volume(scene, CT, "ct")
    seg, (liver, spleen) = _labels_node(scene, vol, segments=[("liver", (1, 0, 0)), ("spleen", (0, 1, 0))])
    truth = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(DATA, "totalseg", "example_seg.nii.gz")))
    drawn = np.zeros_like(truth, np.uint8)
    drawn[[10, 17]] = (truth[[10, 17]] == 5)
    image = mrml_io._oriented_image_from_array(drawn, vol)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(image, seg, liver, logic.MODE_REPLACE)
    before = _labels(seg, vol)
    assert before[17].any()
    segmenter.segment(vol, seg, package, [17], segmentIds=[liver, spleen])
    after = _labels(seg, vol)
    assert not np.array_equal(after[17], before[17]) and np.array_equal(after[10], before[10])
    assert segmenter.undo(seg, vol) == "TSKD slice 17"
    np.testing.assert_array_equal(_labels(seg, vol), before)


def test_follow_and_ranges_never_overwrite_user_slices_and_corrections_are_found(scene, package, segmenter):
    vol = mrml_io.load_volume(scene, CT, "ct")
    seg, (liver, _) = _labels_node(scene, vol, segments=[("liver", (1, 0, 0)), ("spleen", (0, 1, 0))])
    shape = tuple(reversed(vol.GetImageData().GetDimensions()))
    drawn = np.zeros(shape, np.uint8)
    drawn[12, 30:60, 40:80] = 1  # the user's slice
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(mrml_io._oriented_image_from_array(drawn, vol), seg, liver,
                                            logic.MODE_REPLACE)
    user_before = _labels(seg, vol)[12].copy()
    tracker = segmenter.tracker(seg, vol)
    now = [0.0]
    follow = FollowController(tracker.protected, delay_s=0.2, clock=lambda: now[0])
    follow.enabled = True
    for s in (11, 12, 13):
        follow.shown("Red", s)
        now[0] += 0.5
        for due in follow.due():
            segmenter.segment(vol, seg, package, [due], protect=True)
    got = _labels(seg, vol)
    np.testing.assert_array_equal(got[12], user_before)  # follow went over the user's slice
    assert got[11].any() and got[13].any()
    assert 12 in tracker.user_labelled
    # a range never overwrites the user's slice either
    report = segmenter.segment(vol, seg, package, range(8, 16), protect=True)
    assert 12 in report["skipped"] and 12 not in report["slices"]
    np.testing.assert_array_equal(_labels(seg, vol)[12], user_before)
    # the radiologist corrects slice 13 through the segmentation's labelmap API
    assert segmenter.correctedSlices(seg, vol, package) == []
    fixed = mrml_io.segments_to_label_array(seg, [liver], vol)
    fixed[13, 20:40, 20:40] = 1 - fixed[13, 20:40, 20:40]
    assert logic.SetBinaryLabelmapToSegment(mrml_io._oriented_image_from_array(fixed, vol), seg, liver,
                                            logic.MODE_REPLACE)
    assert segmenter.correctedSlices(seg, vol, package) == [13]
    assert segmenter.trainingSlices(seg, vol, package) == [12, 13]
    # and a later range leaves the corrected slice alone
    report = segmenter.segment(vol, seg, package, [13, 14], protect=True)
    assert report["skipped"] == [13]


def test_masking_is_honoured_in_the_scene(scene, package, segmenter):
    vol = mrml_io.load_volume(scene, CT, "ct")
    seg, (liver, tumour) = _labels_node(scene, vol, segments=[("liver", (1, 0, 0)), ("tumour", (1, 1, 0))])
    shape = tuple(reversed(vol.GetImageData().GetDimensions()))
    block = np.zeros(shape, np.uint8)
    block[17] = 1  # the tumour segment covers the whole slice
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(mrml_io._oriented_image_from_array(block, vol), seg, tumour,
                                            logic.MODE_REPLACE)
    editor = slicer.vtkMRMLSegmentEditorNode()  # the Segment Editor's parameter node (not registered in a bare scene)
    editor.SetOverwriteMode(editor.OverwriteNone)
    masking = inprocess.masking_from_editor_node(editor)
    assert masking.overwrite == "none" and masking.editable == "everywhere"
    segmenter.segment(vol, seg, package, [17], segmentIds=[liver], masking=masking)
    assert not mrml_io.segments_to_label_array(seg, [liver], vol)[17].any()  # tumour protected
    assert mrml_io.segments_to_label_array(seg, [tumour], vol)[17].all()
    editor.SetOverwriteMode(editor.OverwriteAllSegments)
    segmenter.segment(vol, seg, package, [17], segmentIds=[liver], masking=inprocess.masking_from_editor_node(editor))
    lv = mrml_io.segments_to_label_array(seg, [liver], vol)[17] > 0
    tu = mrml_io.segments_to_label_array(seg, [tumour], vol)[17] > 0
    assert lv.any() and not (lv & tu).any() and (lv | tu).all()


# -- bad input ----------------------------------------------------------------------------------------
def test_classes_mismatch_writes_nothing(scene, package, segmenter):
    vol = mrml_io.load_volume(scene, CT, "ct")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lesions")
    sid = seg.GetSegmentation().AddEmptySegment("", "tumour", [1, 1, 0])
    with pytest.raises(InteractiveError, match="tumour.*nothing was written"):
        segmenter.segment(vol, seg, package, [5], segmentIds=[sid])
    with pytest.raises(InteractiveError, match="nothing was written"):
        segmenter.segment(vol, seg, package, [5])
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    assert not mrml_io.segments_to_label_array(seg, [sid], vol).any()


def test_modality_mismatch_warns_naming_both(scene, package):
    warnings = []
    seg_ = inprocess.InteractiveSegmenter(interactive.ModelSessionCache(threads=1), warn=warnings.append)
    vol = mrml_io.load_volume(scene, MR, "mr")
    seg, _ = _labels_node(scene, vol, "mr labels")
    report = seg_.segment(vol, seg, package, [3])
    assert len(warnings) == 1 and "'abdomen'" in warnings[0] and "CT" in warnings[0] and "'mr'" in warnings[0]
    assert report["warnings"] == warnings
    seg_.segment(vol, seg, package, [4])
    assert len(warnings) == 1  # once per volume and model


def test_2d_image_is_one_slice(scene, package, segmenter, tmp_path):
    png = sitk.GetArrayFromImage(sitk.ReadImage(US))  # (540, 800) 8-bit ultrasound
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "us")
    vol.SetSpacing(0.13, 0.13, 1.0)  # as a PNG loaded in Slicer: one slice
    slicer.util.updateVolumeFromArray(vol, png[None].astype(np.int16))
    assert vol.GetImageData().GetDimensions()[2] == 1
    seg, _ = _labels_node(scene, vol, "us labels")
    report = segmenter.segment(vol, seg, package, [0])
    assert report["slices"] == [0]
    np.testing.assert_array_equal(_labels(seg, vol), _tskd_segment(package, vol, tmp_path))
    with pytest.raises(InteractiveError, match="single slice"):
        segmenter.suggest(vol, package)
    with pytest.raises(InteractiveError, match="outside"):
        segmenter.segment(vol, seg, package, [1])


def test_session_cache_checksum_failure_marks_library_entry_broken(package, tmp_path):
    lib = models.ModelLibrary(tmp_path / "models")
    info = lib.add(package, name="abdomen")
    cache = interactive.ModelSessionCache(library=lib, threads=1)
    pkg = cache.get(info.path)
    assert cache.get(info.path) is pkg and cache.loads == 1  # verified and loaded once
    onnx = os.path.join(info.path, "model.onnx")
    data = bytearray(open(onnx, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(onnx, "wb") as f:
        f.write(data)
    os.utime(onnx, ns=(os.stat(onnx).st_atime_ns, os.stat(onnx).st_mtime_ns + 10**9))
    with pytest.raises(InteractiveError, match="corrupt.*model.onnx|model.onnx.*corrupt|SHA-256"):
        cache.get(info.path)
    listed = lib.list()[0]
    assert listed.broken and "SHA-256" in listed.broken and listed.row()[0].endswith("(broken)")
    with pytest.raises(InteractiveError, match="marked broken"):
        cache.get(info.path)
    again = lib.add(package, name="abdomen fresh")  # importing a good copy gives a usable entry
    assert not again.broken and cache.get(again.path) is not None


def test_library_versions_keep_the_previous(package, tmp_path):
    lib = models.ModelLibrary(tmp_path / "models")
    v1 = lib.add(package, name="abdomen")
    v2 = lib.add_version(package, v1.path)
    assert v2.name == "abdomen v2" and v2.version == 2 and v2.parent == os.path.basename(v1.path)
    v3 = lib.add_version(package, v2.path)
    assert [m.name for m in lib.versions(v3.path)] == ["abdomen", "abdomen v2", "abdomen v3"]
    assert os.path.isdir(v1.path) and os.path.isdir(v2.path)


def test_label_next_ranks_by_the_area_tskd_segment_names_to_check(scene, package, segmenter, tmp_path):
    """"Label next" scores each slice with the number behind ``tskd segment``'s slices to check
    (``SliceReview.uncertain_mm2``), on an oblique, anisotropic volume under a transform."""
    from TSKDLib.deploy.inference import segment_image

    vol = _oblique_volume(scene)
    pred = segmenter.predictor(vol, package)
    scores = pred.uncertainty(range(pred.num_slices))
    found: dict = {}
    segment_image(package, mrml_io.write_volume(vol, str(tmp_path / "vol.nrrd")), review=found)
    review = found["slices"]
    by_file_slice = dict(zip(review.file_slices.tolist(), review.uncertain_mm2.tolist()))
    assert sorted(by_file_slice) == sorted(scores)
    for s, area in scores.items():
        assert area == pytest.approx(by_file_slice[s], rel=1e-5)
    # mm^2, not a per-pixel mean: at most the slice's area (1.2 x 1.35 mm pixels), above zero here
    (rows, cols) = pred.resizer.in_shape
    assert 0 < min(scores.values()) and max(scores.values()) <= rows * cols * 1.2 * 1.35 * (1 + 1e-5)
    picks = segmenter.suggest(vol, package, count=4, labelled=[10, 20], minGap=2)
    assert len(picks) == 4
    for s, score in picks:
        assert min(abs(s - t) for t in (10, 20)) >= 2 and score == pytest.approx(scores[s])
    best_free = max((v, s) for s, v in scores.items() if min(abs(s - t) for t in (10, 20)) >= 2)[1]
    assert picks[0][0] == best_free
    assert [p[1] for p in picks] == sorted([p[1] for p in picks], reverse=True)


def test_label_next_view_position_round_trips_under_a_transform(scene):
    vol = _oblique_volume(scene)
    for index in (0, 7, 29):
        ras = mrml_io.slice_center_ras(vol, 0, index)  # where the Red view is moved
        assert mrml_io.slice_index_at(vol, ras, 0) == index
    with pytest.raises(ValueError, match="outside"):
        mrml_io.slice_center_ras(vol, 0, 30)


def test_follow_only_views_of_the_models_plane(scene):
    vol = _oblique_volume(scene)
    m = mrml_io.ijk_to_ras(vol)
    t = vtk.vtkMatrix4x4()
    vol.GetParentTransformNode().GetMatrixTransformToWorld(t)
    world = np.array([[t.GetElement(r, c) for c in range(4)] for r in range(4)]) @ m
    k_dir = world[:3, 2] / np.linalg.norm(world[:3, 2])
    i_dir = world[:3, 0] / np.linalg.norm(world[:3, 0])
    def view(normal):  # a slice view whose normal is `normal`
        v = np.eye(4)
        v[:3, 2] = normal
        return v
    assert mrml_io.view_shows_axis(vol, view(k_dir), 0)  # the oblique acquisition plane: follows
    assert mrml_io.view_shows_axis(vol, view(-k_dir), 0)
    assert not mrml_io.view_shows_axis(vol, view(i_dir), 0)  # a perpendicular view: ignored
    tilted = np.cos(np.radians(30)) * k_dir + np.sin(np.radians(30)) * i_dir
    assert not mrml_io.view_shows_axis(vol, view(tilted), 0)  # 30 degrees off the model's plane
    assert mrml_io.view_shows_axis(vol, view(tilted), 0, tolerance_deg=31)


def test_backend_found_from_module_dir():
    before = list(sys.path)
    try:
        interactive.ensure_backend_importable(os.path.join(ROOT, "TSKDSlicer"))
        assert ROOT in sys.path
    finally:
        sys.path[:] = before
