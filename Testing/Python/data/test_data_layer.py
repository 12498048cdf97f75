"""Data layer on the real bundled scans: reading, geometry pairing, slicing, round trips, errors."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CT_CLASSES, ROOT, TOTALSEG
from TSKDLib import GeometryError, InputError, LabelError, RunExistsError
from TSKDLib.data.case import load_2d_cases, load_case, prepare_case_slices, prepare_slices
from TSKDLib.data.classmap import ClassMap
from TSKDLib.data.dataset import SliceDataset
from TSKDLib.data.geometry import LabelGeometryWarning, pair_labels_with_image, to_canonical
from TSKDLib.data.io import read_image, read_label_file, write_labelmap
from TSKDLib.data.preprocess import Normalization, SliceResizer


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * (a & b).sum() / s


@pytest.fixture(scope="module")
def dicom_case(dicom_dir, dicom_labels, ct_label_map):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelGeometryWarning)
        return load_case(dicom_dir, dicom_labels, ct_label_map, classes=CT_CLASSES)


# ------------------------------------------------------------------------------------------------
# Reading every bundled scan
# ------------------------------------------------------------------------------------------------
def test_read_every_bundled_scan(dicom_dir):
    img, info = read_image(dicom_dir)
    assert img.GetSize() == (512, 512, 20) and info.modality == "CT"
    assert np.allclose(img.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    arr = sitk.GetArrayViewFromImage(img)
    assert arr.dtype == np.float32 and arr.min() < -900  # HU: air present
    for name, size in [("example_ct_sm.nii.gz", (122, 101, 30)), ("example_mr_sm.nii.gz", (117, 91, 20))]:
        img, _ = read_image(TOTALSEG / name)
        assert img.GetSize() == size and img.GetPixelID() == sitk.sitkFloat32
    us, info = read_image(ROOT / "Testing/Data/hc18/images/000_HC.png")
    assert us.GetSize() == (800, 540, 1) and info.is_2d


def test_small_ct_and_mr_cases_same_grid_no_warning():
    for img, seg, cmap in [("example_ct_sm.nii.gz", "example_seg.nii.gz", "label_map_total_ct.json"),
                           ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "label_map_total_mr.json")]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LabelGeometryWarning)
            case = load_case(TOTALSEG / img, TOTALSEG / seg, TOTALSEG / cmap, classes=["liver", "spleen"])
        lab = case.label_slices()
        assert set(np.unique(lab)) == {0, 1, 2}
        assert case.labelled.all()  # every slice holds some label
        # Canonical frame: x towards patient left. Liver (patient right) has smaller x than spleen.
        assert np.nonzero(lab == 1)[2].mean() < np.nonzero(lab == 2)[2].mean()


def test_slices_stay_valid_after_the_case_is_gone():
    """``load_case(...).label_slices()`` (no case kept): the arrays hold their images, so they
    still read the scan after a garbage collection and new allocations (a bare SimpleITK view
    read freed memory there)."""
    import gc

    args = (TOTALSEG / "example_mr_sm.nii.gz", TOTALSEG / "example_seg_mr.nii.gz", TOTALSEG / "label_map_total_mr.json")
    case = load_case(*args)
    want_labels, want_image = np.array(case.label_slices()), np.array(case.image_slices())
    del case
    labels, image = load_case(*args).label_slices(), load_case(*args).image_slices()
    gc.collect()
    junk = [np.full(labels.size * 4, 7, np.uint8) for _ in range(20)]  # reuse the freed memory
    assert np.array_equal(labels, want_labels) and np.array_equal(image, want_image) and junk
    assert not labels.flags.writeable and not image.flags.writeable


def test_hc18_folder_pairs_and_subjects(hc18_dir):
    cases = load_2d_cases(hc18_dir / "images", hc18_dir / "masks", hc18_dir / "labels.json")
    assert len(cases) == 40 and len({c.subject for c in cases}) >= 20
    assert cases[0].class_map.names == ["fetal_head"] and cases[0].class_map.values == [255]
    lab = cases[0].label_slices()
    assert lab.shape == (1, 540, 800) and set(np.unique(lab)) == {0, 1}
    # The filled head ellipse covers a sizeable, single region.
    assert 0.05 < lab.mean() < 0.6


# ------------------------------------------------------------------------------------------------
# Geometry: pairing through physical space
# ------------------------------------------------------------------------------------------------
def test_dicom_labels_with_flipped_y_land_on_the_voxel_they_label(dicom_dir, dicom_labels, dicom_case):
    """The label file's y axis is flipped relative to the DICOM series: every liver voxel of the
    label file must land on the image voxel at the same physical point."""
    img, _ = read_image(dicom_dir)
    raw = sitk.ReadImage(str(dicom_labels))
    assert raw.GetDirection()[4] == -1.0 and img.GetDirection()[4] == 1.0
    raw_arr = sitk.GetArrayFromImage(raw)
    paired = sitk.GetArrayFromImage(dicom_case.labels)
    k, j, i = np.nonzero(raw_arr == 5)  # liver in the label file
    sel = np.random.default_rng(0).choice(len(k), 2000, replace=False)
    for kk, jj, ii in zip(k[sel], j[sel], i[sel]):
        p = raw.TransformIndexToPhysicalPoint((int(ii), int(jj), int(kk)))
        x, y, z = img.TransformPhysicalPointToIndex(p)
        assert paired[z, y, x] == 1  # class index 1 = liver
    # Liver on liver: pairing by array shape would flip it; the mean HU differs accordingly.
    hu = sitk.GetArrayViewFromImage(img)
    liver_hu = hu[paired == 1].mean()
    naive_hu = hu[raw_arr == 5].mean()
    assert 30 < liver_hu < 200, liver_hu  # soft-tissue HU (contrast-enhanced liver)
    assert abs(liver_hu - naive_hu) > 30


def test_pairing_warns_once_and_rejects_disjoint_labels(dicom_dir, dicom_labels):
    img, _ = read_image(dicom_dir)
    raw = sitk.ReadImage(str(dicom_labels))
    with pytest.warns(LabelGeometryWarning, match="resampled"):
        pair_labels_with_image(img, raw, "labels.nii.gz")
    far = sitk.Image(raw)
    far.SetOrigin((5000.0, 0.0, 0.0))
    with pytest.raises(GeometryError, match=r"does not overlap.*size=\[512, 512, 20\]"):
        pair_labels_with_image(img, far, "far.nii.gz")


def _oblique_anisotropic(tmp_path: Path, flip_slices: bool = False) -> tuple[Path, Path, np.ndarray]:
    """The real small CT and its labels rewritten with permuted, flipped file axes, anisotropic
    spacing and a new origin: same anatomy, very different array order.

    File axes (i, j, k) point to (+S, +R, +P) (or -S for i with ``flip_slices``); the original
    file's axes point to (R, A, S) (direction diag(-1, -1, 1))."""
    src = sitk.ReadImage(str(TOTALSEG / "example_ct_sm.nii.gz"))
    seg = sitk.ReadImage(str(TOTALSEG / "example_seg.nii.gz"))
    assert np.allclose(src.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    spacing = np.array((2.5, 0.8, 1.7))
    direction = np.array([[0, -1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)  # columns: i->+S, j->R, k->+P
    origin = np.array((-12.5, 40.0, 300.0))
    out = []
    for im, name in [(src, "img.nrrd"), (seg, "seg.nrrd")]:
        a = sitk.GetArrayFromImage(im)  # (z, y, x) = (S, A, R) file axes k, j, i
        arr = np.ascontiguousarray(np.transpose(a, (1, 2, 0))[::-1])  # (k'=P, j'=R, i'=S)
        d, o = direction.copy(), origin.copy()
        if flip_slices:
            arr = np.ascontiguousarray(arr[:, :, ::-1])
            o = o + d[:, 0] * spacing[0] * (arr.shape[2] - 1)
            d[:, 0] *= -1
        new = sitk.GetImageFromArray(arr)
        new.SetSpacing(spacing.tolist())
        new.SetOrigin(o.tolist())
        new.SetDirection(d.flatten().tolist())
        sitk.WriteImage(new, str(tmp_path / name))
        out.append(tmp_path / name)
    return out[0], out[1], sitk.GetArrayFromImage(seg)


def test_axial_slices_follow_direction_matrix_not_array_order(tmp_path):
    img_p, seg_p, _ = _oblique_anisotropic(tmp_path)
    case = load_case(img_p, seg_p, TOTALSEG / "label_map_total_ct.json", classes=["liver", "spleen"])
    canon = to_canonical(case.image)
    assert np.allclose(np.array(canon.GetDirection()).reshape(3, 3), np.eye(3))
    # axial slices are perpendicular to S: the file's i axis (2.5 mm) is the slice axis.
    assert case.num_slices == case.image.GetSize()[0]
    assert case.slice_spacing() == (1.7, 0.8)  # rows along P (file k), columns along L (file j)
    lab = case.label_slices()
    assert np.nonzero(lab == 1)[2].mean() < np.nonzero(lab == 2)[2].mean()  # liver right of spleen
    # Exact inverse back onto the oblique, anisotropic grid: voxel for voxel.
    back = case.to_original(lab)
    assert back.GetSize() == case.image.GetSize()
    assert np.allclose(back.GetDirection(), case.image.GetDirection())
    assert np.allclose(back.GetOrigin(), case.image.GetOrigin())
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(case.labels))


def test_explicit_labelled_slices_count_in_file_order(tmp_path):
    img_p, seg_p, ref = _oblique_anisotropic(tmp_path)
    case = load_case(img_p, seg_p, TOTALSEG / "label_map_total_ct.json", classes=["liver"],
                     labelled_slices=[0, 3])
    assert case.labelled_indices() == [0, 3]  # file axis i points to +S, like canonical z
    flip_dir = tmp_path / "flipped"
    flip_dir.mkdir()
    img_f, seg_f, _ = _oblique_anisotropic(flip_dir, flip_slices=True)
    flipped = load_case(img_f, seg_f, TOTALSEG / "label_map_total_ct.json", classes=["liver"],
                        labelled_slices=[0, 3])
    n = flipped.num_slices
    assert flipped.labelled_indices() == [n - 4, n - 1]  # file slice k is canonical n-1-k
    # Both describe the same anatomy: identical canonical slices.
    assert np.array_equal(case.label_slices(), flipped.label_slices())
    assert np.array_equal(case.image_slices(), flipped.image_slices())
    # ...and the same as the original file's axial slices (S-up, with R->L and A->P flips).
    orig = load_case(TOTALSEG / "example_ct_sm.nii.gz", TOTALSEG / "example_seg.nii.gz",
                     TOTALSEG / "label_map_total_ct.json", classes=["liver"])
    assert np.array_equal(orig.label_slices(), case.label_slices())


def test_all_background_slice_can_count_as_labelled(dicom_dir, dicom_labels, ct_label_map):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelGeometryWarning)
        case = load_case(dicom_dir, dicom_labels, ct_label_map, classes=["kidney_left"],
                         labelled_slices=[4, 5])
    assert case.labelled_indices() == [4, 5]
    s = prepare_slices([case], 64)
    assert s.labelled.tolist().count(True) == 2
    assert (s.labels[s.labelled] == 0).all()        # labelled, all background
    assert (s.labels[~s.labelled] == -1).all()      # unlabelled: ignored, never background


# ------------------------------------------------------------------------------------------------
# Slicing, resizing and the exact inverse
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [512, 1024])
def test_label_slices_model_size_round_trip_is_exact(dicom_case, size):
    lab = dicom_case.label_slices()
    resizer = SliceResizer.create(lab.shape[1:], size, dicom_case.slice_spacing())
    there = resizer.to_model(torch.from_numpy(lab.astype(np.int64)), mode="nearest")
    back = resizer.from_model(there, mode="nearest").numpy()
    assert np.array_equal(back, lab)
    vol = dicom_case.to_original(back)
    assert np.array_equal(sitk.GetArrayViewFromImage(vol), sitk.GetArrayViewFromImage(dicom_case.labels))
    assert dice(sitk.GetArrayViewFromImage(vol) == 1, sitk.GetArrayViewFromImage(dicom_case.labels) == 1) == 1.0


def test_aspect_ratio_kept_with_padding_and_upsampling_round_trip(hc18_dir):
    case = load_2d_cases(hc18_dir / "images", hc18_dir / "masks", hc18_dir / "labels.json", names=["000_HC"])[0]
    lab = case.label_slices()
    r = SliceResizer.create(lab.shape[1:], 256)
    assert r.new_shape == (173, 256) and r.pad == (41, 0)
    assert r.valid_mask().sum() == 173 * 256
    # small CT upsampled (101x122 -> 256): nearest round trip is exact
    ct = load_case(TOTALSEG / "example_ct_sm.nii.gz", TOTALSEG / "example_seg.nii.gz",
                   TOTALSEG / "label_map_total_ct.json", classes=CT_CLASSES)
    lab = ct.label_slices()
    r = SliceResizer.create(lab.shape[1:], 256, ct.slice_spacing())
    back = r.from_model(r.to_model(torch.from_numpy(lab.astype(np.int64)), "nearest"), "nearest").numpy()
    assert np.array_equal(back, lab)
    # downsampling 512 -> 256 keeps organs well (high Dice, not exact)
    imgs, labels, r2, _ = prepare_case_slices(ct, 64)
    assert imgs.shape == (30, 1, 64, 64) and float(imgs.min()) >= 0 and float(imgs.max()) <= 1


def test_normalisation_presets(dicom_case):
    raw = dicom_case.image_slices()
    ct = Normalization.for_modality("CT").fit(raw)
    assert (ct.lo, ct.hi) == (-160.0, 240.0)  # abdomen window W400 L40
    x = ct(raw)
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    mr = Normalization.preset("mr").fit(raw)
    assert mr.lo == pytest.approx(np.percentile(raw, 0.5))
    assert Normalization.for_modality(None, raw).kind == "window"  # air at -1000 HU -> CT


def test_dataset_augmentation_keeps_unlabelled_ignored(hc18_dir, dicom_case):
    s = prepare_slices([dicom_case], 128)
    ds = SliceDataset(s, augment=True, seed=0)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 128, 128) and item["image"].dtype == torch.float32
        assert float(item["image"].min()) >= 0 and float(item["image"].max()) <= 1
        if item["labelled"]:
            assert item["label"].min() >= 0 and item["label"].max() <= 4
        else:
            assert (item["label"] == -1).all()
    # Augmentation moves the image and its labels together: the label stays on the organ.
    plain = SliceDataset(s)[2]
    aug = ds[2]
    assert not torch.equal(plain["image"], aug["image"])


# ------------------------------------------------------------------------------------------------
# Segmentation files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz", ".nrrd"])
def test_write_and_read_labelmap_keeps_geometry_and_names(tmp_path, suffix):
    img_p, seg_p, _ = _oblique_anisotropic(tmp_path)
    case = load_case(img_p, seg_p, TOTALSEG / "label_map_total_ct.json", classes=["liver", "spleen"])
    out = write_labelmap(case.labels, tmp_path / f"pred{suffix}", case.class_map)
    cmap = None if suffix == ".seg.nrrd" else case.class_map
    labels, cm = read_label_file(out, cmap)
    assert cm.names == ["liver", "spleen"]
    back = pair_labels_with_image(case.image, labels)
    if suffix == ".seg.nrrd":
        assert cm.colors == case.class_map.colors
        expected = sitk.GetArrayViewFromImage(case.labels)
    else:
        expected = case.class_map.to_values(sitk.GetArrayViewFromImage(case.labels))
    assert np.array_equal(sitk.GetArrayViewFromImage(back), expected)
    with pytest.raises(RunExistsError, match="--overwrite"):
        write_labelmap(case.labels, out, case.class_map)


def test_seg_nrrd_as_training_labels(tmp_path, dicom_case, dicom_dir):
    out = write_labelmap(dicom_case.labels, tmp_path / "partial.seg.nrrd", dicom_case.class_map)
    case = load_case(dicom_dir, out)
    assert case.class_map.names == CT_CLASSES
    assert np.array_equal(case.label_slices(), dicom_case.label_slices())


# ------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file and the fix
# ------------------------------------------------------------------------------------------------
def _err(exc_info, path) -> str:
    msg = str(exc_info.value)
    assert str(path) in msg and "Fix:" in msg, msg
    return msg


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError) as e:
        read_image(tmp_path / "nope.nii.gz")
    assert "not found" in _err(e, tmp_path / "nope.nii.gz")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(InputError) as e:
        read_image(bad)
    _err(e, bad)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(empty_dir)


def test_4d_and_rgb_volumes_rejected(tmp_path):
    vol4 = sitk.JoinSeries([sitk.Image(4, 4, 4, sitk.sitkFloat32)] * 2)
    sitk.WriteImage(vol4, str(tmp_path / "t.nii.gz"))
    with pytest.raises(InputError) as e:
        read_image(tmp_path / "t.nii.gz")
    assert "4D" in _err(e, tmp_path / "t.nii.gz")
    rgb = sitk.Image([8, 8, 3], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError) as e:
        read_image(tmp_path / "rgb.nrrd")
    assert "RGB" in _err(e, tmp_path / "rgb.nrrd")


def test_nan_and_empty_images_rejected(tmp_path):
    a = np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32)
    a[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "nan.mha"))
    with pytest.raises(InputError) as e:
        read_image(tmp_path / "nan.mha")
    assert "NaN" in _err(e, tmp_path / "nan.mha")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32)), str(tmp_path / "zero.nii.gz"))
    with pytest.raises(InputError) as e:
        read_image(tmp_path / "zero.nii.gz")
    assert "empty" in _err(e, tmp_path / "zero.nii.gz")


def test_label_values_missing_from_class_map(tmp_path):
    cmap = tmp_path / "cmap.json"
    cmap.write_text(json.dumps({"1": "spleen", "5": "liver"}))  # the file has many more values
    with pytest.raises(LabelError) as e:
        load_case(TOTALSEG / "example_ct_sm.nii.gz", TOTALSEG / "example_seg.nii.gz", cmap)
    msg = _err(e, TOTALSEG / "example_seg.nii.gz")
    assert re.search(r"label values \[2, 3", msg)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LabelError) as e:
        ClassMap.from_json(bad)
    _err(e, bad)
    with pytest.raises(LabelError, match="not in the class map"):
        load_case(TOTALSEG / "example_ct_sm.nii.gz", TOTALSEG / "example_seg.nii.gz",
                  TOTALSEG / "label_map_total_ct.json", classes=["heart_of_gold"])


def test_no_labelled_slice(tmp_path):
    src = sitk.ReadImage(str(TOTALSEG / "example_seg.nii.gz"))
    empty = sitk.Image(src.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(src)
    sitk.WriteImage(empty, str(tmp_path / "empty_seg.nii.gz"))
    with pytest.raises(LabelError) as e:
        load_case(TOTALSEG / "example_ct_sm.nii.gz", tmp_path / "empty_seg.nii.gz",
                  TOTALSEG / "label_map_total_ct.json", require_labels=True)
    assert "no labelled slice" in _err(e, tmp_path / "empty_seg.nii.gz")


def test_tskdlib_never_imports_slicer_qt_ctk():
    pattern = re.compile(r"^\s*(import|from)\s+(qt|ctk|slicer|vtkSlicer\w*)\b", re.M)
    offenders = [p for p in (ROOT / "TSKDLib").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
