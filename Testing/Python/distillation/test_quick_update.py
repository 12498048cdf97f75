"""Issue 13, item 4: ``tskd update`` fine-tunes the current student on its transfer set plus the
corrected slices, reusing the run's teacher outputs (the teacher is never run), and reports Dice
on the corrected slices before and after.

The run folder is built from the real bundled CT (example_ct_sm, 30 slices) at S = 64 with a
stand-in teacher cache (the reference labels as confident probabilities) and a briefly trained
student, so the test takes seconds instead of a full ``tskd train``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # end-to-end `tskd update` processes (tiny budgets)

from TSKDLib.data.case import load_case, prepare_case_slices, prepare_slices  # noqa: E402
from TSKDLib.distillation.distill import DistillConfig, TransferSet, build_teacher_cache, distill  # noqa: E402
from TSKDLib.deploy.export import export_model_package  # noqa: E402
from TSKDLib.data.geometry import LabelGeometryWarning  # noqa: E402
from TSKDLib.deploy.inference import Cleanup, load_model_package  # noqa: E402
from TSKDLib.distillation.student import save_student  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TOTALSEG = ROOT / "Testing" / "Data" / "totalseg"
CT = TOTALSEG / "example_ct_sm.nii.gz"
SEG = TOTALSEG / "example_seg.nii.gz"
MAP = TOTALSEG / "label_map_total_ct.json"
CLASSES = ["liver", "spleen"]
TRAIN_SLICES = [8, 20]
CORRECTED = [12, 16]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("runs") / "ct_small"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelGeometryWarning)
        case = load_case(CT, SEG, MAP, classes=CLASSES, labelled_slices=TRAIN_SLICES)
        full = load_case(CT, SEG, MAP, classes=CLASSES)
    slices = prepare_slices([case], 64)
    (run / "prepare").mkdir(parents=True)
    slices.save(run / "prepare" / "slices.pt")
    reference = prepare_slices([full], 64)  # every slice labelled: the stand-in teacher's answer
    k1 = len(CLASSES) + 1

    def teacher(x):
        idx = [int(torch.argmin((reference.images.flatten(1) - xi.flatten()).abs().sum(1))) for xi in x]
        probs = torch.nn.functional.one_hot(reference.labels[idx].clamp(min=0), k1).permute(0, 3, 1, 2).float()
        return torch.zeros(len(x), 1, 1, 1), probs * 0.96 + 0.04 / k1

    transfer = TransferSet.build(slices)
    cache = build_teacher_cache(teacher, transfer.images, directory=run / "distillation" / "teacher_cache",
                                with_embedding=False)
    res = distill(transfer, DistillConfig(steps=40, finetune_steps=5, batch_size=4, min_steps=40, seed=0,
                                          checkpoint_every=10**9, device="cpu"), cache, "unet-s")
    save_student(res.model, run / "distillation" / "student.pt")
    _, _, _, norm = prepare_case_slices(case, 64)
    export_model_package(res.model, run / "model", slices.class_map, norm, input_size=64, torchscript=False,
                         name="ct_small", acquisition={"planes": ["axial"], "directions": [[0, 0, 1]]},
                         postprocessing={"one_object": [CLASSES[0]], "min_fraction": 0.2,
                                         "locations": {CLASSES[0]: {"centre_mm": [-60.0, 20.0], "radius_mm": 50.0},
                                                       CLASSES[1]: {"centre_mm": [90.0, 40.0], "radius_mm": 30.0}}})
    (run / "state.json").write_text(json.dumps({"stages": {"prepare": {"done": True}}, "finished": True}))
    return run


def _update(model, out, *extra, slices=CORRECTED):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "TSKDLib", "update", str(model), "--image", str(CT), "--labels", str(SEG),
           "--class-map", str(MAP), "--slices", ",".join(map(str, slices)), "--out", str(out),
           "--steps", "60", "--finetune-steps", "20", "--threads", "1", "--device", "cpu", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


def test_quick_update_raises_dice_on_corrected_slices_and_keeps_the_previous(run_dir, tmp_path):
    before_card = (run_dir / "model" / "model_card.json").read_text()
    report = tmp_path / "update.json"
    r = _update(run_dir / "model", tmp_path / "v2", "--report", str(report))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["slices"] == CORRECTED and set(result["dice_before"]) == set(CLASSES)
    assert result["mean_after"] > result["mean_before"], result
    assert "Dice on slices [12, 16]: before" in r.stdout
    # where the update changed the slices nobody corrected: every class, named slices outside the corrected
    assert set(result["changes"]) == set(CLASSES), result["changes"]
    for name, change in result["changes"].items():
        assert 0.0 <= change["agreement"] <= 1.0 and change["changed_pixels"] >= 0
        assert set(change["slices"]) <= set(range(30)) - set(CORRECTED) and len(change["slices"]) <= 3
        assert (name in result["review"]) == (change["agreement"] < 0.95 and bool(change["slices"]))
    assert "elsewhere on this scan the updated model agrees with the previous one: liver" in r.stdout
    assert f"tskd segment {tmp_path / 'v2'} SCAN" in r.stdout and "--slices 12,16,NEW" in r.stdout  # the next round
    assert set(result["painted_before"]) == set(result["painted_after"]) == set(CLASSES)
    assert all(isinstance(v, int) and v >= 0 for v in result["painted_after"].values())
    pkg = load_model_package(tmp_path / "v2", verify=True)  # checksums, student.pt included
    assert "student.pt" in pkg.card["files"]
    qu = pkg.card["training"]["quick_updates"][-1]
    assert qu["slices"] == CORRECTED and qu["dice_after"] == result["dice_after"]
    assert qu["image"] == str(CT.resolve())  # absolute: tskd segment finds the file from any folder
    assert qu["changes"] == result["changes"] and qu["review"] == result["review"]
    assert pkg.card["training"]["run_dir"] == str(run_dir.resolve())
    # tskd segment's clean-up of the one-object classes carries over to the updated model
    assert pkg.card["postprocessing"] == json.loads(before_card)["postprocessing"]
    assert pkg.single_object_classes == (1,)
    assert pkg.class_locations == {1: (-60.0, 20.0, 50.0)}  # only the one-object classes are placed
    assert Cleanup.for_package(pkg).locations == {1: (-60.0, 20.0, 50.0)}
    assert Cleanup.for_package(pkg, all_components=True).locations == {}
    assert (run_dir / "model" / "model_card.json").read_text() == before_card  # previous model untouched
    # a second update starts from the updated package (its student.pt), found through its card
    r2 = _update(tmp_path / "v2", tmp_path / "v3", slices=[14])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert len(load_model_package(tmp_path / "v3").card["training"]["quick_updates"]) == 2
    # tskd segment of the corrected scan never names a slice corrected in the model's updates as one
    # to check first (a user repeating "correct the named slices, update" gets new slices each round)
    from TSKDLib.pipeline.run import segment

    [third] = segment(tmp_path / "v3", [CT], out=tmp_path / "seg_v3.nii.gz", overwrite=True)
    assert third["corrected_slices"] == [12, 14, 16]
    assert len(third["check_slices"]) == 3 and not set(third["check_slices"]) & {12, 14, 16}, third
    copy = tmp_path / "other_scan.nii.gz"  # another file: its slices were never corrected
    copy.write_bytes(CT.read_bytes())
    [other] = segment(tmp_path / "v3", [copy], out=tmp_path / "seg_copy.nii.gz", overwrite=True)
    assert other["corrected_slices"] == [] and len(other["check_slices"]) == 3
    [first] = segment(run_dir / "model", [CT], out=tmp_path / "seg_v1.nii.gz", overwrite=True)
    assert first["corrected_slices"] == []


def test_quick_update_errors_name_the_fix(run_dir, tmp_path):
    lone = tmp_path / "lone"  # a package copied away from its run, whose card records no run
    import shutil
    shutil.copytree(run_dir / "model", lone)
    r = _update(lone, tmp_path / "x")
    assert r.returncode == 2 and "training run of this model" in r.stderr and "--run RUN_DIR" in r.stderr
    r = _update(lone, tmp_path / "x", "--run", str(run_dir), "--axis", "axial")
    assert r.returncode == 2 and "--axis axial differs" in r.stderr
    r = _update(run_dir / "model", tmp_path / "x", slices=[99])  # the scan has 30 slices
    assert r.returncode == 2 and "tskd: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x").exists()


def test_quick_update_from_a_slicer_scene(run_dir, tmp_path):
    """What the Segment Editor's "Quick update" does, on a real MRML scene (slicer-core): the
    corrected slices are exported from the segmentation (every class of the model) and `tskd
    update` learns from them."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    import SimpleITK as sitk

    sys.path.insert(0, str(ROOT / "TSKDSlicer"))
    from TSKDSlicerLib import inprocess, mrml_io

    mrml_io.register_converter_rules()
    scene = slicer.vtkMRMLScene()
    vol = mrml_io.load_volume(scene, str(CT), "ct")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG)))  # same grid as the CT
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    mapping = {}
    for k, (name, value) in enumerate((("liver", 5), ("spleen", 1)), start=1):
        sid = seg.GetSegmentation().AddEmptySegment("", name, [1, 0, 0])
        drawn = (ref == value).astype("uint8")
        drawn[[i for i in range(ref.shape[0]) if i not in CORRECTED]] = 0  # the corrected slices only
        assert logic.SetBinaryLabelmapToSegment(mrml_io._oriented_image_from_array(drawn, vol), seg, sid,
                                                logic.MODE_REPLACE)
        mapping[sid] = k
    names = load_model_package(run_dir / "model", verify=False).class_map.names
    mapping = {sid: names.index(seg.GetSegmentation().GetSegment(sid).GetName()) + 1 for sid in mapping}
    inputs = inprocess.quick_update_inputs(vol, seg, mapping, names, CORRECTED, str(tmp_path / "in"))
    assert inputs["slices"] == "12,16"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    report = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "TSKDLib", "update", str(run_dir / "model"), "--image", inputs["image"],
                        "--labels", inputs["labels"], "--class-map", inputs["class_map"], "--slices", inputs["slices"],
                        "--out", str(tmp_path / "v2"), "--report", str(report), "--steps", "60",
                        "--finetune-steps", "20", "--threads", "1", "--device", "cpu", "--progress-json"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["mean_after"] > result["mean_before"], result
    assert '"event": "done"' in r.stdout
