"""Oblique scans (issue 16): slices are taken in the plane the scan was acquired in.

The oblique volumes are the bundled scans with rotated direction cosines: exact rewrites (the
voxels stay, the header says another orientation), for 30, 45 and 60 degree rotations about one
and two axes, plus a short-axis-like stack (1.25 mm pixels, 8 mm slices, slice normal 54.7
degrees from every patient axis, like a cardiac short-axis cine)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TOTALSEG
from TSKDLib import InputError, LabelError
from TSKDLib.data import geometry
from TSKDLib.data.case import check_label_coverage, load_case
from TSKDLib.data.geometry import ArrayGeometry

CT = TOTALSEG / "example_ct_sm.nii.gz"       # 122x101x30, 3 mm, RAS file axes
SEG = TOTALSEG / "example_seg.nii.gz"
CMAP = TOTALSEG / "label_map_total_ct.json"


def rot(axis: str, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def rewrite(src: Path, dest: Path, r: np.ndarray, spacing=None) -> Path:
    """Same voxels, header rotated by ``r`` (direction' = r @ direction), optionally new spacing."""
    img = sitk.ReadImage(str(src))
    if spacing is not None:
        img.SetSpacing(spacing)
    img.SetDirection((r @ np.array(img.GetDirection()).reshape(3, 3)).flatten().tolist())
    sitk.WriteImage(img, str(dest))
    return dest


ROTATIONS = {f"{a}{d}": rot(a, d) for a in ("z", "x") for d in (30, 45, 60)}
ROTATIONS.update({f"x{d}z{d}": rot("z", d) @ rot("x", d) for d in (30, 45, 60)})
# Short-axis-like header (direction columns i, j, k in LPS): the slice normal k is 54.7 degrees from
# every patient axis and the in-plane j axis is the one closest to S (as in the issue: the "axial"
# slices of this stack are 19-pixel strips across the acquired slices). The example file's own
# direction is diag(-1, -1, 1), so rotating by M @ diag(-1, -1, 1) makes its header M.
_M = np.stack([np.array([-1, 1, 0]) / np.sqrt(2), np.array([-1, -1, 2]) / np.sqrt(6),
               np.array([1, 1, 1]) / np.sqrt(3)], axis=1)
SHORT_AXIS = _M @ np.diag([-1.0, -1.0, 1.0])
SHORT_SPACING = (1.25, 1.25, 8.0)


@pytest.fixture(scope="module")
def reference():
    return load_case(CT, SEG, CMAP, classes=["liver", "spleen"])


@pytest.mark.parametrize("name", list(ROTATIONS) + ["short_axis"])
def test_oblique_rewrite_slices_the_files_own_slices_and_maps_back_exactly(tmp_path, reference, name):
    r, sp = (SHORT_AXIS, SHORT_SPACING) if name == "short_axis" else (ROTATIONS[name], None)
    img_p, seg_p = rewrite(CT, tmp_path / "img.nii.gz", r, sp), rewrite(SEG, tmp_path / "seg.nii.gz", r, sp)
    case = load_case(img_p, seg_p, CMAP, classes=["liver", "spleen"], labelled_slices=[2, 17, 29])
    assert case.axis == "acquisition" and case.frame.file_slice_axis == 2  # the file's k axis
    assert case.num_slices == 30 and case.slice_spacing() == ((sp or (3.0,) * 3)[1], (sp or (3.0,) * 3)[0])
    # Each frame slice is one of the file's own slices (any in-plane flip/transpose), nothing else.
    file_arr = sitk.GetArrayViewFromImage(case.labels)  # (k, j, i)
    lab = case.label_slices()
    assert lab.shape[0] == 30 and sorted(lab.shape[1:]) == [101, 122]
    for s in range(30):
        k = case.frame.frame_to_file_slice(s)
        assert np.array_equal(np.sort(lab[s], axis=None), np.sort(file_arr[k], axis=None))
    # --labelled-slices are the file's own slice indices along that axis.
    assert case.labelled_file_indices() == [2, 17, 29]
    for s in case.labelled_indices():
        assert lab[s].any()
    # Voxel-exact back onto the oblique grid.
    back = case.to_original(lab)
    assert back.GetSize() == case.image.GetSize()
    assert np.allclose(back.GetDirection(), case.image.GetDirection(), atol=0)
    assert np.allclose(back.GetOrigin(), case.image.GetOrigin(), atol=0)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), file_arr)
    # Small rotations keep the frame of the axis-aligned file: identical slices.
    if name in ("z30", "x30", "x30z30"):
        assert np.array_equal(lab, reference.label_slices())
        assert np.array_equal(case.image_slices(), reference.image_slices())


def test_short_axis_stack_the_issue_scenario(tmp_path):
    img_p = rewrite(CT, tmp_path / "img.nii.gz", SHORT_AXIS, SHORT_SPACING)
    seg_p = rewrite(SEG, tmp_path / "seg.nii.gz", SHORT_AXIS, SHORT_SPACING)
    image = sitk.ReadImage(str(img_p))
    assert geometry.acquisition_plane(image) == "oblique"
    assert geometry.acquisition_axis(image.GetSize(), image.GetSpacing()) == 2
    # The named "axial" frame slices along an in-plane axis here (the old behaviour): strips.
    axial = load_case(img_p, seg_p, CMAP, classes=["liver"], axis="axial")
    assert axial.frame.file_slice_axis != 2 and axial.num_slices != 30
    acq = load_case(img_p, seg_p, CMAP, classes=["liver"])
    assert acq.num_slices == 30 and len(acq.labelled_indices()) == 30
    # Slices holding none of the classes: a clear error naming classes and slices, before training.
    none = load_case(img_p, seg_p, CMAP, classes=["kidney_right", "kidney_left"], labelled_slices=[24, 26, 28, 29])
    with pytest.raises(LabelError, match=r"no class has a labelled voxel.*slices 24,26,28,29 \(file axis k"):
        check_label_coverage([none])
    one = load_case(img_p, seg_p, CMAP, classes=["kidney_right", "liver"], labelled_slices=[24, 26])
    with pytest.raises(LabelError, match=r"class 'kidney_right' has no labelled voxel"):
        check_label_coverage([one])
    single = load_case(img_p, seg_p, CMAP, classes=["kidney_right", "liver"], labelled_slices=[18, 26])
    warns = check_label_coverage([single])
    assert len(warns) == 1 and "kidney_right" in warns[0] and "single slice" in warns[0]
    with pytest.raises(LabelError, match="outside the image.*30 acquisition slices"):
        load_case(img_p, seg_p, CMAP, classes=["liver"], labelled_slices=[4, 6, 30])


def test_acquisition_axis_rule_and_named_axes_on_axis_aligned_scans(reference):
    assert geometry.acquisition_axis((512, 512, 20), (0.98, 0.98, 2.0)) == 2
    assert geometry.acquisition_axis((256, 19, 256), (1.25, 8.0, 1.25)) == 1   # stack stored on j
    assert geometry.acquisition_axis((512, 512, 300), (0.78, 0.78, 0.5)) == 2  # thin slices, square pixels
    assert geometry.acquisition_axis((40, 300, 300), (2.5, 0.8, 1.7)) == 0     # all differ: largest
    assert geometry.acquisition_axis((3, 3, 3), (1.0, 1.0, 1.0)) == 2
    assert geometry.acquisition_axis((800, 540, 1), (0.1, 0.1, 0.1)) == 2      # 2D image
    # Axis-aligned: acquisition == axial, and the named axes equal the canonical LPS reorientation.
    img = reference.image
    canon = sitk.GetArrayFromImage(geometry.to_canonical(img))  # a copy: a view of a temporary image dangles
    for axis, a in geometry.SLICE_AXES.items():
        frame = geometry.slice_frame(img, axis)
        assert np.array_equal(frame.to_array(sitk.GetArrayViewFromImage(img)), np.moveaxis(canon, a, 0))
    assert geometry.slice_frame(img).perm == geometry.slice_frame(img, "axial").perm
    assert geometry.slice_frame(img).flip == geometry.slice_frame(img, "axial").flip


def test_tiny_train_and_segment_round_trip_on_an_oblique_scan(tmp_path, torch_threads):
    """Train (tiny budget) on a 30-degree double-oblique rewrite of 6 real CT slices; segment it
    and the axis-aligned original: same labels voxel for voxel, each on its own exact grid. A scan
    acquired in another plane (sagittal rewrite) is refused."""
    from conftest import TOTALSEG as T
    from TSKDLib.pipeline.config import PipelineConfig, tiny_config
    from TSKDLib.data.io import read_image
    from TSKDLib.pipeline.run import segment, train

    image, _ = read_image(T / "ct_dicom")
    image = image[:, :, 8:14]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", geometry.LabelGeometryWarning)
        labels = geometry.pair_labels_with_image(image, sitk.ReadImage(str(T / "example_seg_dicom.nii.gz")))
    flat, flat_seg = tmp_path / "flat.nii.gz", tmp_path / "flat_seg.nii.gz"
    sitk.WriteImage(image, str(flat))
    sitk.WriteImage(labels, str(flat_seg))
    r = ROTATIONS["x30z30"]
    obl, obl_seg = rewrite(flat, tmp_path / "obl.nii.gz", r), rewrite(flat_seg, tmp_path / "obl_seg.nii.gz", r)
    cfg = PipelineConfig.from_dict(tiny_config())
    cfg.distillation["steps"] = 4
    res = train([obl], [obl_seg], out=tmp_path / "run", class_map=T / "label_map_total_ct.json",
                classes=["liver", "spleen"], labelled_slices=[[0, 2, 4]], config=cfg, device="cpu",
                threads=torch_threads, synthesis=False)
    card = json.loads((res.model_dir / "model_card.json").read_text())
    assert card["slice_axis"] == "acquisition" and card["acquisition"]["planes"] == ["axial"]
    cases = json.loads((res.run_dir / "prepare" / "cases.json").read_text())["cases"]
    assert cases[0]["labelled_file_slices"] == [0, 2, 4] and cases[0]["file_slice_axis"] == "k"
    out = segment(res.model_dir, [obl, flat], out=tmp_path / "seg", fmt="nii.gz", cleanup=False)
    a, b = (sitk.ReadImage(o["output"]) for o in out)
    for pred, ref in ((a, sitk.ReadImage(str(obl))), (b, image)):
        assert pred.GetSize() == ref.GetSize()
        assert np.allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-6)
        assert np.allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    sag = sitk.ReadImage(str(flat))
    sag.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))  # k (the 2 mm stack) now runs along L
    sitk.WriteImage(sag, str(tmp_path / "sag.nii.gz"))
    with pytest.raises(InputError, match="acquired in the sagittal plane.*axial acquisitions"):
        segment(res.model_dir, [tmp_path / "sag.nii.gz"], out=tmp_path / "sag_seg.nii.gz")
    from TSKDLib.errors import ConfigError
    with pytest.raises(ConfigError, match="trained on acquisition slices, not axial"):
        segment(res.model_dir, [flat], out=tmp_path / "x.nii.gz", axis="axial")


def test_train_stops_before_the_teacher_when_the_labelled_slices_hold_no_label(tmp_path):
    """The issue's run on the short-axis rewrite: the given slices hold none of the classes."""
    import subprocess
    import sys

    from conftest import ROOT
    img_p = rewrite(CT, tmp_path / "img.nii.gz", SHORT_AXIS, SHORT_SPACING)
    seg_p = rewrite(SEG, tmp_path / "seg.nii.gz", SHORT_AXIS, SHORT_SPACING)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "TSKDLib", "train", str(img_p), "--labels", str(seg_p),
                        "--class-map", str(CMAP), "--classes", "kidney_right", "kidney_left",
                        "--labelled-slices", "24,26,28,29", "--out", str(out), "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no class has a labelled voxel on the labelled slices" in r.stderr
    assert "acquisition slices 24,26,28,29 (file axis k, 30 slices)" in r.stderr and "Fix:" in r.stderr
    assert not (out / "teacher").exists()


def test_teacher_validation_dice_zero_ends_the_run(tmp_path, monkeypatch):
    import TSKDLib.teacher as teacher_mod
    from TSKDLib.pipeline.config import PipelineConfig, tiny_config
    from TSKDLib.errors import TSKDError
    from TSKDLib.pipeline.run import train

    monkeypatch.setattr(teacher_mod, "finetune_teacher", lambda t, ds, cfg, progress, work_dir=None:
                        (t, {"best_val_dice": 0.0}))
    with pytest.raises(TSKDError, match="validation Dice is 0"):
        train([CT], [SEG], out=tmp_path / "run", class_map=CMAP, classes=["liver"], labelled_slices=[[3, 9, 15]],
              config=PipelineConfig.from_dict(tiny_config()), device="cpu", synthesis=False)
    assert not (tmp_path / "run" / "distillation").exists()


@pytest.mark.parametrize("name", ["z30", "x45", "x30z30", "short_axis"])
def test_frame_geometry_puts_every_frame_voxel_where_the_file_has_it(tmp_path, name):
    """``SliceFrame.frame_geometry`` (no voxel copied) maps each frame index to the physical point
    of the same file voxel, on oblique headers with anisotropic spacing; ``shifted`` keeps the
    scan's centre; ``offsets_lps`` is measured from the centre of the whole grid."""
    r, sp = (SHORT_AXIS, SHORT_SPACING) if name == "short_axis" else (ROTATIONS[name], (0.8, 1.1, 3.0))
    img = sitk.ReadImage(str(rewrite(CT, tmp_path / "o.nii.gz", r, sp)))
    ids = sitk.GetImageFromArray(np.arange(np.prod(img.GetSize()), dtype=np.int32).reshape(img.GetSize()[::-1]))
    ids.CopyInformation(img)
    frame = geometry.slice_frame(img, "acquisition" if name != "short_axis" else "axial")
    arr = frame.to_array(sitk.GetArrayViewFromImage(ids))
    g = frame.frame_geometry(img)
    size = np.array(img.GetSize(), float)
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    rng = np.random.default_rng(0)
    picks = np.stack([rng.integers(0, n, 20) for n in arr.shape], axis=1)
    for start in (0, 3):
        gs = g.shifted(0, start) if start else g
        for n, h, w in picks:
            if n < start:
                continue
            file_index = np.unravel_index(arr[n, h, w], img.GetSize()[::-1])[::-1]  # (i, j, k)
            want = np.array(img.TransformIndexToPhysicalPoint([int(v) for v in file_index])) - centre
            assert np.allclose(gs.offsets_lps(np.array([[n - start, h, w]]))[0], want, atol=1e-6)


def test_class_locations_follow_the_patient_through_the_header(tmp_path, reference):
    """Where a class lies (LPS x, y from the scan's centre, and its radius) is read through the
    header: on the real CT the liver is on the patient's right (x < 0) and the spleen on the left
    (x > 0), the liver the wider; rotating the header by 30 degrees about the patient's S axis
    rotates both centres by the same angle and keeps the radii."""
    from TSKDLib.deploy.inference import class_locations_lps

    def locations(case):
        return class_locations_lps(case.label_slices(), case.frame.frame_geometry(case.image), (1, 2))

    flat = locations(reference)
    assert flat[1][0] < -30 and flat[2][0] > 30  # mm: liver right of the centre, spleen left
    assert flat[1][2] > flat[2][2] > 10  # RMS radii, mm
    r = ROTATIONS["z30"]
    turned = locations(load_case(rewrite(CT, tmp_path / "ct.nii.gz", r), rewrite(SEG, tmp_path / "seg.nii.gz", r),
                                 CMAP, classes=["liver", "spleen"]))
    for k in (1, 2):
        assert np.allclose(turned[k][:2], r[:2, :2] @ np.array(flat[k][:2]), atol=1e-3)
        assert np.isclose(turned[k][2], flat[k][2], atol=1e-3)


def test_cleanup_removes_the_one_object_part_that_lies_on_the_wrong_side(tmp_path, reference):
    """The real CT's spleen relabelled "liver" is a second liver part on the patient's left. With
    the size rule out of play (fraction 0), the location rule keeps the part near where the liver
    lay in training and removes the other, whichever is larger; it reads the side from the header
    (a mirrored header keeps the other part), needs the geometry, and never removes every part."""
    from TSKDLib.deploy.inference import Cleanup, class_locations_lps, cleanup_labels

    labels = np.ascontiguousarray(reference.label_slices())
    g = reference.frame.frame_geometry(reference.image)
    liver_at = class_locations_lps(labels, g, (1,))[1][:2]
    spleen_at = class_locations_lps(labels, g, (2,))[2][:2]
    pred = np.where(labels == 2, 1, labels).astype(np.uint8)  # two liver parts: right (real) and left
    spacing = reference.canonical_image.GetSpacing()[::-1]

    def clean(location, geometry_of, margin=60.0):
        opts = Cleanup(single_object=(1,), single_object_fraction=0.0, locations={1: location},
                       location_margin_mm=margin)
        return cleanup_labels(pred, 2, spacing, opts, geometry_of)

    out = clean(liver_at, g)
    assert np.array_equal(out == 1, labels == 1)  # the left part is gone, the real liver untouched
    out = clean(spleen_at, g)
    assert np.array_equal(out == 1, labels == 2)  # told the class lies left: the left part stays
    assert np.array_equal(clean(liver_at, None), pred)  # no geometry: nothing removed for its place
    assert np.array_equal(clean(liver_at, g, margin=1000.0), pred)  # both within the margin
    assert np.array_equal(clean((*liver_at, 500.0), g), pred)  # a class this wide: twice its radius
    assert np.array_equal(clean((*liver_at, 20.0), g) == 1, labels == 1)  # a narrow one: 60 mm
    far = (liver_at[0] - 2000.0, liver_at[1])  # both parts far: the better placed one still stays
    assert np.array_equal(clean(far, g) == 1, labels == 1)
    # the real liver found only in part, smaller than a fifth of the misplaced part: the size rule
    # alone keeps the misplaced one; placed first, the size rule keeps the real part
    zc, yc, xc = (int(v.mean()) for v in np.nonzero(labels == 1))
    for h in range(1, 40):
        box = np.zeros_like(labels, bool)
        box[max(zc - h, 0):zc + h + 1, max(yc - h, 0):yc + h + 1, max(xc - h, 0):xc + h + 1] = True
        if (box & (labels == 1)).sum() >= 0.1 * (labels == 2).sum():
            break
    part = np.where(labels == 2, 1, np.where(box & (labels == 1), 1, 0)).astype(np.uint8)
    assert 0.05 <= (box & (labels == 1)).sum() / (labels == 2).sum() < 0.2
    by_size = cleanup_labels(part, 2, spacing, Cleanup(single_object=(1,)), g)
    assert np.array_equal(by_size == 1, labels == 2)
    placed = cleanup_labels(part, 2, spacing, Cleanup(single_object=(1,), locations={1: liver_at}), g)
    assert np.array_equal(placed == 1, box & (labels == 1))
    mirrored = ArrayGeometry(g.origin * np.array([-1, 1, 1]), g.spacing, np.diag([-1, 1, 1]) @ g.direction,
                             g.centre * np.array([-1, 1, 1]))  # the same array, left and right swapped
    # mirrored, the real liver lies 122 mm from the liver's place, the spleen part 84 mm (it is
    # posterior): with a 30 mm margin the real liver goes, as the header says it is on the left
    assert np.array_equal(clean(liver_at, mirrored, margin=30.0) == 1, labels == 2)
    assert np.array_equal(clean(liver_at, g, margin=30.0) == 1, labels == 1)


def test_cleanup_gives_a_misnamed_part_back_to_the_organ_it_touches(tmp_path):
    """The real CT's spleen with its middle third of slices named "liver" (the student's organ
    confusion), on a header turned 30 degrees about S with anisotropic spacing: the liver's
    location rule removes that part; it touches the spleen's kept body and lies where the spleen
    lay, so it is spleen again and the result is the clean-up of the true labels. It stays
    removed without the rule, when the spleen's place is unknown or far, when a slice of gap
    keeps it from the spleen, and when it is under 1 mL."""
    from TSKDLib.deploy.inference import (
        REASSIGN_MIN_MM3,
        Cleanup,
        class_locations_lps,
        cleanup_labels,
    )

    r, sp = ROTATIONS["z30"], (0.8, 1.1, 3.0)
    case = load_case(rewrite(CT, tmp_path / "ct.nii.gz", r, sp), rewrite(SEG, tmp_path / "seg.nii.gz", r, sp),
                     CMAP, classes=["liver", "spleen"])
    labels = np.ascontiguousarray(case.label_slices())
    g = case.frame.frame_geometry(case.image)
    at = class_locations_lps(labels, g, (1, 2))
    spacing = case.canonical_image.GetSpacing()[::-1]
    zs = np.flatnonzero((labels == 2).any(axis=(1, 2)))
    mid = zs[len(zs) // 3: 2 * len(zs) // 3]
    named = np.zeros_like(labels, bool)
    named[mid] = labels[mid] == 2
    pred = np.where(named, 1, labels).astype(np.uint8)
    assert named.sum() * float(np.prod(spacing)) > REASSIGN_MIN_MM3

    def clean(labelmap, locations, reassign=True, spacing_zyx=spacing):
        opts = Cleanup(fill_holes=True, single_object=(1, 2), locations=locations, reassign_parts=reassign)
        return cleanup_labels(labelmap, 2, spacing_zyx, opts, g)

    both = {1: at[1], 2: at[2]}
    assert np.array_equal(clean(pred, both), clean(labels, both))  # the spleen whole again
    assert (clean(pred, both, reassign=False)[named] == 0).all()  # the liver's rule alone removes it
    assert (clean(pred, {1: at[1]})[named] == 0).all()  # where the spleen lies is unknown
    far = {1: at[1], 2: (at[2][0] + 300.0, at[2][1], at[2][2])}
    assert (clean(pred, far)[named] == 0).all()  # the part lies far from the spleen's place
    gap = pred.copy()
    gap[[mid[0] - 1, mid[-1] + 1]] = np.where(labels[[mid[0] - 1, mid[-1] + 1]] == 2, 0, labels[[mid[0] - 1, mid[-1] + 1]])
    assert (clean(gap, both)[named] == 0).all()  # it touches no spleen
    tiny = tuple(s / 10 for s in spacing)  # the same part measured 1000 times smaller: under 1 mL
    out = clean(pred, both, spacing_zyx=tiny)
    assert (out[named] == 0).all() and np.array_equal(out == 2, clean(pred, both, reassign=False) == 2)


def test_a_labelled_slice_where_the_organ_vanishes_is_named_before_training(tmp_path):
    """A labelling slip: the real CT's spleen erased on one labelled slice in the middle of its
    labelled extent (as CHAOS scan 31's reference has it), on a mirrored, rotated header with
    anisotropic spacing. ``check_label_coverage`` warns once, naming the class and the file's own
    slice indices of the slip and of its labelled neighbours; the same slip copied onto the next
    labelled slice is found on both; the intact labels, an organ end and the same slip on a grid
    where the spleen covers under 5 cm^2 (fine in-plane spacing) give no warning."""
    from TSKDLib.data.case import labelled_slice_dips

    r = ROTATIONS["x30z30"] @ np.diag([1.0, 1.0, -1.0])  # the frame runs against the file's k
    spleen = int(next(k for k, v in json.loads(CMAP.read_text()).items() if v == "spleen"))

    def warnings_for(erase, labelled, sp=(2.5, 3.5, 4.0), copy=False):
        img_p = rewrite(CT, tmp_path / "ct.nii.gz", r, sp)
        seg = sitk.ReadImage(str(rewrite(SEG, tmp_path / "seg.nii.gz", r, sp)))
        arr = sitk.GetArrayFromImage(seg)  # (k, j, i): the file's slices along k
        for k in erase:
            arr[k][arr[k] == spleen] = 0
            if copy:  # the slipped slice's labels copied onto the next one, every class
                arr[k + 1] = arr[k]
        lab = sitk.GetImageFromArray(arr)
        lab.CopyInformation(seg)
        sitk.WriteImage(lab, str(tmp_path / "slip.nii.gz"))
        case = load_case(img_p, tmp_path / "slip.nii.gz", CMAP, classes=["liver", "spleen"], labelled_slices=labelled)
        warns = labelled_slice_dips(case)
        assert check_label_coverage([case]) == warns
        return warns

    picks = list(range(1, 30, 4))  # the spleen spans all 30 slices of the file's k axis
    mid = picks[len(picks) // 2]
    assert warnings_for([], picks) == []
    warns = warnings_for([mid], picks)
    i = picks.index(mid)
    assert len(warns) == 1 and "'spleen'" in warns[0]
    assert f"labelled slice {mid}, against" in warns[0] and f"slices {picks[i + 1]} and {picks[i - 1]}:" in warns[0]
    both = warnings_for([mid], sorted(picks + [mid + 1]), copy=True)
    assert len(both) == 2 and f"slice {mid + 1}," in both[0] and f"slice {mid}," in both[1]
    assert warnings_for([picks[0]], picks) == []  # an organ end: nothing before it to compare with
    assert warnings_for([mid], picks, sp=(0.8, 1.1, 4.0)) == []  # under 5 cm^2 either side
