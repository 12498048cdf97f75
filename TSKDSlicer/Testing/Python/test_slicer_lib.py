"""Plain classes of the Slicer module (TSKDSlicerLib): labels, models, training requests, install
helpers. No Slicer needed."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "TSKDSlicer"))

from TSKDSlicerLib import install, labels, models, training  # noqa: E402


# -- labels ---------------------------------------------------------------------------------------

def test_slice_axis_follows_direction_not_array_order():
    assert labels.slice_axis_for(np.eye(3), "axial") == 0  # k runs along S
    assert labels.slice_axis_for(np.eye(3), "sagittal") == 2
    # A coronally acquired volume: k runs along A, j along S.
    coronal = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)
    assert labels.slice_axis_for(coronal, "axial") == 1
    assert labels.slice_axis_for(coronal, "coronal") == 0
    with pytest.raises(ValueError):
        labels.slice_axis_for(np.eye(3), "oblique")


def test_labelled_slices_counts_and_background():
    arr = np.zeros((6, 4, 4), np.uint8)
    arr[1, 0, 0] = 1
    arr[3, 1, 1] = 2
    arr[3, 2, 2] = 1
    assert labels.labelled_slices(arr) == [1, 3]
    assert labels.labelled_slices(arr, 1) == [0, 1, 2]
    assert labels.slice_counts(arr, {1: "liver", 2: "spleen"}) == {"liver": 2, "spleen": 1}
    assert labels.effective_labelled_slices(arr, 0, [5, 1]) == [1, 3, 5]
    with pytest.raises(ValueError):
        labels.effective_labelled_slices(arr, 0, [6])


def test_ranges_roundtrip_and_spec():
    assert labels.compress_ranges([9, 1, 2, 3, 7, 10, 3]) == "1-3,7,9-10"
    assert labels.parse_ranges("1-3, 7,9-10") == [1, 2, 3, 7, 9, 10]
    assert labels.labelled_slices_spec([4, 11, 12, 20]) == "4,11-12,20"
    with pytest.raises(ValueError):
        labels.parse_ranges("5-2")
    with pytest.raises(ValueError):
        labels.labelled_slices_spec([])


def test_spec_is_what_the_backend_parses():
    from TSKDLib.cli.args import parse_slices_arg
    from TSKDLib.errors import InputError

    assert parse_slices_arg(labels.labelled_slices_spec([0, 4, 5, 6, 11])) == [0, 4, 5, 6, 11]
    assert parse_slices_arg(" 7, 3-4,3") == [3, 4, 7]
    assert parse_slices_arg(None) is None
    for bad in ("5-2", "-1", "a", "1-b"):
        with pytest.raises(InputError, match="--labelled-slices"):
            parse_slices_arg(bad)


def test_labelled_slice_rule_is_the_backends():
    from TSKDLib.data import slices

    assert labels.labelled_slices is slices.labelled_slices
    assert labels.parse_ranges is slices.parse_slices and labels.compress_ranges is slices.format_slices


# -- models ---------------------------------------------------------------------------------------

def _package(path, name="liver model", dice=None):
    os.makedirs(path)
    card = {"format": "tskd-model", "format_version": 1, "name": name, "created": "2026-11-21T19:40:02Z",
            "classes": [{"index": 1, "value": 6, "name": "liver", "color": [200, 100, 50]}],
            "input_size": 256, "slice_axis": "axial",
            "validation": {"dice": dice if dice is not None else {"liver": 0.8, "mean": 0.8}}}
    with open(os.path.join(path, "model_card.json"), "w") as f:
        json.dump(card, f)
    with open(os.path.join(path, "model.onnx"), "wb") as f:
        f.write(b"\0" * 2048)
    return path


def test_model_library_add_list_rename_export_delete(tmp_path):
    src = _package(str(tmp_path / "run" / "model"))
    lib = models.ModelLibrary(tmp_path / "models")
    assert lib.list() == []
    info = lib.add(src)
    assert info.name == "liver model" and info.class_names == ["liver"] and info.dice == pytest.approx(0.8)
    assert info.size_bytes > 2048 and info.row()[2] == "0.800" and info.row()[3] == "2026-11-21 19:40"
    second = lib.add(src)  # same name -> a new folder, never overwritten
    assert second.path != info.path and len(lib.list()) == 2
    renamed = lib.rename(second.path, "Liver v2")
    assert renamed.name == "Liver v2" and os.path.basename(renamed.path) == "Liver_v2"
    exported = lib.export(renamed.path, str(tmp_path))
    assert models.read_card(exported)["name"] == "Liver v2"
    with pytest.raises(models.ModelLibraryError):
        lib.export(renamed.path, str(tmp_path))  # exists
    lib.delete(renamed.path)
    assert [m.name for m in lib.list()] == ["liver model"]
    with pytest.raises(models.ModelLibraryError):
        lib.delete(src)  # outside the library: refused
    assert os.path.isdir(src)


def test_invalid_packages_are_rejected(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_card.json").write_text('{"format": "other"}')
    with pytest.raises(models.ModelLibraryError):
        models.read_card(bad)
    with pytest.raises(models.ModelLibraryError):
        models.read_card(tmp_path)
    newer = _package(str(tmp_path / "newer"))
    card = json.load(open(os.path.join(newer, "model_card.json")))
    card["format_version"] = 99
    json.dump(card, open(os.path.join(newer, "model_card.json"), "w"))
    with pytest.raises(models.ModelLibraryError, match="version"):
        models.read_card(newer)
    assert models.mean_dice({"validation": {"dice": {"a": 0.5, "b": 1.0}}}) == pytest.approx(0.75)
    assert models.mean_dice({}) is None


# -- training requests ----------------------------------------------------------------------------

def test_config_keys_exist_in_backend_configs():
    """Each advanced setting maps onto a field of the backend's stage config (where it exists)."""
    import dataclasses
    import importlib
    owners = {"teacher": ("TSKDLib.teacher.training", "TeacherConfig"),
              "synthesis": ("TSKDLib.synthesis", "SynthesisConfig"),
              "student": ("TSKDLib.distillation.student", "StudentConfig"),
              "distillation": ("TSKDLib.distillation.distill", "DistillConfig")}
    checked = 0
    for key, (section, name) in training.CONFIG_KEYS.items():
        module, cls = owners[section]
        try:
            config_cls = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            continue  # that backend stage is not there yet
        if key == "init_student":
            continue  # backend feature still to come (fine-tuning an existing student)
        assert name in {f.name for f in dataclasses.fields(config_cls)}, (key, section, name)
        checked += 1
    if not checked:
        pytest.skip("no backend stage config importable")


def test_advanced_settings_only_changed_values():
    assert training.AdvancedSettings().overrides() == {}
    cfg = training.AdvancedSettings(foundation_model="sam_vit_b", lora_rank=4, num_synthetic=200,
                                    student="unet_small", checkpoint="/w.pth").overrides()
    assert cfg == {"teacher": {"backend": "sam_vit_b", "lora_rank": 4, "checkpoint": "/w.pth"},
                   "synthesis": {"num_images": 200}, "student": {"arch": "unet_small"}, "synthesis_enabled": True}


def test_train_request_roundtrip_and_resume_args(tmp_path):
    run = str(tmp_path / "runs" / training.new_run_name("liver & spleen"))
    assert "liver_spleen" in run
    req = training.TrainRequest(run_dir=run, images=["a.nrrd"], labels=["a.nii.gz"], labelled_slices=["4,9"],
                                preset="balanced", device="cpu", advanced={"lora_rank": 8})
    req.write()
    again = training.TrainRequest.read(run)
    args = again.args()
    assert args[args.index("--labelled-slices") + 1] == "4,9"
    assert args[args.index("--config") + 1] == again.config_path and "--overwrite" not in args
    assert json.load(open(again.config_path)) == {"teacher": {"lora_rank": 8}}
    runs = training.list_runs(str(tmp_path / "runs"))
    assert len(runs) == 1 and not runs[0]["finished"]
    plain = training.TrainRequest(run_dir=str(tmp_path / "r2"), images=["a"], labels=["b"], labelled_slices=[])
    plain.write()
    assert "--labelled-slices" not in plain.args() and "--config" not in plain.args()


# -- install helpers ------------------------------------------------------------------------------

def test_requirements_and_pinned_constraints(tmp_path):
    res = os.path.join(ROOT, "TSKDSlicer", "Resources")
    reqs = install.read_requirement_lines(os.path.join(res, "requirements.txt"))
    names = {install.requirement_name(r) for r in reqs}
    assert not names & {"torch", "torchvision", "numpy", "simpleitk", "requests"}  # never from pip here
    assert {install.requirement_name(r) for r in
            install.read_requirement_lines(os.path.join(res, "requirements-segment.txt"))} >= {"onnxruntime"}
    pinned = install.write_pinned_constraints(os.path.join(res, "constraints.txt"), str(tmp_path / "c.txt"))
    lines = open(pinned).read().split()
    import importlib.metadata
    assert f"numpy=={importlib.metadata.version('numpy')}" in lines
    assert install.is_satisfied("numpy>=1.0") and not install.is_satisfied("surely-not-installed-pkg-xyz")


def test_slicer_requirements_cover_the_backends_training_dependencies():
    """Training inside Slicer installs TSKDSlicer/Resources/requirements.txt: every runtime
    dependency of the backend (pyproject.toml) must be there, except what Slicer or the PyTorch
    extension provides and what only the benchmarks use; nothing declared there goes unused."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = {install.requirement_name(r) for r in tomllib.load(f)["project"]["dependencies"]}
    reqs = {install.requirement_name(r) for r in install.read_requirement_lines(
        os.path.join(ROOT, "TSKDSlicer", "Resources", "requirements.txt"))}
    provided = {"torch", "torchvision",  # PyTorch extension (PyTorchUtils)
                "numpy", "simpleitk", "vtk", "scipy", "pillow",  # Slicer's own Python packages
                "matplotlib", "itk-morphologicalcontourinterpolation"}  # benchmarks only
    assert deps - provided <= reqs, f"missing from requirements.txt: {sorted(deps - provided - reqs)}"
    assert "accelerate" not in reqs


def test_slice_axis_matches_the_backend_on_oblique_and_anisotropic_headers():
    """The module counts slices, finds "this slice" and labelled slices along the same voxel axis
    as the backend (TSKDLib.data.geometry.slice_frame) for every --axis choice."""
    SimpleITK = pytest.importorskip("SimpleITK")
    from TSKDLib.data import geometry

    def rot(axis, deg):
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        return r

    short_axis = np.stack([np.array([-1, 1, 0]) / np.sqrt(2), np.array([-1, -1, 2]) / np.sqrt(6),
                           np.array([1, 1, 1]) / np.sqrt(3)], axis=1)
    headers = [(rot("z", d) @ rot("x", d), (0.98, 0.98, 2.0), (20, 18, 6)) for d in (0, 30, 45, 60)]
    headers += [(short_axis, (1.25, 1.25, 8.0), (24, 24, 5)), (rot("y", 90), (1.0, 1.0, 1.0), (8, 9, 10)),
                (np.eye(3)[:, [1, 2, 0]], (1.25, 8.0, 1.25), (24, 5, 24)), (np.eye(3), (0.2, 0.2, 1.0), (30, 20, 1))]
    for lps, spacing, size in headers:
        image = SimpleITK.Image(list(size), SimpleITK.sitkUInt8)
        image.SetSpacing(spacing)
        image.SetDirection(lps.flatten().tolist())
        ras = np.diag([-1.0, -1.0, 1.0]) @ lps @ np.diag(spacing)  # Slicer's IJK-to-RAS (3x3)
        for orientation in labels.ORIENTATIONS:
            backend = geometry.slice_frame(image, orientation).file_slice_axis
            assert labels.slice_axis_for(ras, orientation, size=size) == 2 - backend, (orientation, spacing)
        assert labels.acquisition_axis is geometry.acquisition_axis  # one rule, TSKDLib.data.slices
