"""Distillation that transfers the teacher (issue 15): pseudo-labels with 3D consistency, the
sparse-slice protocol, Fill between slices, evidence-based stopping and the quality gate.

All on the bundled real CT (20-slice DICOM series, liver and spleen; TotalSegmentator labels
paired through physical space) at 64 px, with tiny budgets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from TSKDLib.data.case import prepare_slices
from TSKDLib.distillation.distill import (DistillConfig, TeacherCache, TransferSet, distill, quality_gate,
                                         single_object_classes, teacher_pseudo_labels)
from TSKDLib.pipeline.progress import NullProgress
from TSKDLib.evaluation.sparse_benchmark import region_masks, score_regions, sparse_slice_indices

CT2 = ["liver", "spleen"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Before any other fixture of the module (autouse): one torch thread (root conftest)."""


@pytest.fixture(scope="module")
def full64(ct_case):
    """Every slice of the CT at 64 px with its reference labels."""
    return prepare_slices([ct_case], 64)




def _probs_from(labels: torch.Tensor, k1: int, conf: float = 0.95) -> np.ndarray:
    """A confident teacher's probabilities ``(N, K+1, S, S)`` for label maps ``(N, S, S)``."""
    one = F.one_hot(labels.clamp(min=0), k1).permute(0, 3, 1, 2).float()
    return (one * conf + (1 - one) * (1 - conf) / (k1 - 1)).numpy().astype(np.float16)


# ------------------------------------------------------------------------------------------------
def test_sparse_slice_indices_follow_each_class_extent(ct_case):
    lab = ct_case.label_slices()
    picks = sparse_slice_indices(lab, 2, per_class=3)
    for c in (1, 2):
        z = np.flatnonzero((lab == c).reshape(len(lab), -1).any(1))
        for f in (0.25, 0.5, 0.75):
            assert int(round(z[0] + f * (z[-1] - z[0]))) in picks
    assert picks == sorted(set(picks)) and 2 <= len(picks) <= 6
    assert sparse_slice_indices(np.zeros((5, 4, 4), np.uint8), 2) == []
    masks = region_masks(10, [3, 6])
    assert masks["between"].tolist() == [False] * 4 + [True, True] + [False] * 4
    assert (masks["within"] == (masks["between"] | masks["outside"])).all() and not masks["within"][[3, 6]].any()


def test_fill_between_slices_interpolates_real_organs(ct_case):
    pytest.importorskip("itk")
    from TSKDLib.evaluation.interpolation import fill_between_slices

    lab = ct_case.label_slices().astype(np.uint8)
    z = np.flatnonzero((lab == 1).reshape(len(lab), -1).any(1))
    drawn = [int(z[0]) + 2, int(z[0] + z[-1]) // 2, int(z[-1]) - 2]
    out = fill_between_slices(lab, drawn)
    assert out.shape == lab.shape
    assert np.array_equal(out[drawn], lab[drawn])  # drawn slices unchanged
    inner = [k for k in range(drawn[0] + 1, drawn[-1]) if k not in drawn]
    p, r = out[inner] == 1, lab[inner] == 1
    dice = 2 * (p & r).sum() / (p.sum() + r.sum())
    assert dice > 0.85, dice  # the liver between the drawn slices
    assert not out[: drawn[0]].any() and not out[drawn[-1] + 1:].any()  # nothing extrapolated
    scores = score_regions(out, lab, 2, (5.0, 1.0, 1.0), region_masks(len(lab), drawn))
    assert scores["between"][1]["dice"] == pytest.approx(dice, abs=0.02)
    assert scores["outside"][1]["dice"] < 0.5  # the organ ends are missed: the interpolation's limit


def test_pseudo_labels_drop_disconnected_hallucinations(full64):
    k1 = 3
    labelled = [6, 12]
    sl = full64.with_labelled(labelled)
    transfer = TransferSet.build(sl)
    ref = full64.labels.clone()
    fake = ref.clone()
    organ_free = [i for i in range(len(ref)) if not (ref[i] > 0).any()]
    far = organ_free[0] if organ_free else 0
    fake[far, 2:8, 2:8] = 2  # a confident "spleen" on a slice away from every organ
    probs = _probs_from(fake, k1)
    probs[10, :, 30, 30] = np.array([0.4, 0.35, 0.25], np.float16)  # an unsure pixel
    targets, info = teacher_pseudo_labels(probs, transfer, threshold=0.9, consistency_3d=True)
    assert targets.dtype == torch.int16 and targets.shape == ref.shape
    assert int(targets[10, 30, 30]) == -1  # below the confidence threshold: ignored
    if organ_free:
        assert (targets[far, 2:8, 2:8] == 0).all()  # the disconnected blob became background
        assert info["removed_by_3d_filter"][2] >= 36
    for i in labelled:  # the user's labels win on labelled slices
        assert torch.equal(targets[i].long()[full64.valid[i]], ref[i][full64.valid[i]])
    # the real organs, connected to what the user drew, are kept
    keep = (ref == 1) & (targets >= 0)
    assert (targets[keep] == 1).float().mean() > 0.99
    off, _ = teacher_pseudo_labels(probs, transfer, threshold=0.9, consistency_3d=False)
    if organ_free:
        assert (off[far, 2:8, 2:8] == 2).all()
    # the user's labels of each organ touch one object of the teacher: both are one-object classes
    assert info["objects"] == {1: 1, 2: 1} and single_object_classes(info) == [1, 2]
    # the user labels a second, separate spleen on a labelled slice: the spleen is not one object
    two = full64.labels.clone()
    two[6, 1:4, 1:4] = 2
    assert not (ref[5:8, 0:5, 0:5] > 0).any()
    sl2 = full64.with_labelled(labelled)
    sl2.labels = torch.where(sl2.labels >= 0, two, sl2.labels)
    _, info2 = teacher_pseudo_labels(_probs_from(two, k1), TransferSet.build(sl2), threshold=0.9)
    assert info2["objects"][2] == 2 and single_object_classes(info2) == [1]


def test_pseudo_labels_stop_where_the_organ_ends(data_dir):
    """The bundled MR's right kidney (it ends inside the scan), labelled on the sparse protocol's
    slices: beyond the outermost labelled slice the teacher's mask narrows with the organ and is
    kept; a part that widens again past the tip is removed (background); no real organ voxel is."""
    import warnings

    from TSKDLib.data.case import load_case
    from TSKDLib.data.geometry import LabelGeometryWarning
    from TSKDLib.distillation.distill import beyond_organ_ends

    ts = data_dir / "totalseg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelGeometryWarning)
        case = load_case(ts / "example_mr_sm.nii.gz", ts / "example_seg_mr.nii.gz", ts / "label_map_total_mr.json",
                         classes=["liver", "kidney_right"])
    full = prepare_slices([case], 64)
    ref = full.labels.numpy()
    labelled = sparse_slice_indices(ref, 2, 3)
    drawn = np.zeros_like(ref, bool)
    drawn[labelled] = ref[labelled] == 2
    for k in (1, 2):  # real organs: nothing is cut
        d = np.zeros_like(ref, bool)
        d[labelled] = ref[labelled] == k
        assert not beyond_organ_ends(ref == k, d).any()
    z = np.flatnonzero((ref == 2).any(axis=(1, 2)))
    tip = int(z[-1]) if len(ref) - 1 - z[-1] >= 2 else int(z[0])
    out = 1 if tip == z[-1] else -1
    assert not (ref[tip + out] == 2).any() and not (ref[tip + 2 * out] == 2).any()
    fake = ref.copy()
    y, x = np.nonzero(ref[tip] == 2)
    cy, cx = int(y.mean()), int(x.mean())
    for n, zz in enumerate((tip + out, tip + 2 * out)):  # wider and wider past the tip: not the kidney
        r = 4 + 3 * n
        fake[zz, max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] = 2
    mask = fake == 2
    cut = beyond_organ_ends(mask, drawn)
    assert cut[tip + 2 * out].sum() == mask[tip + 2 * out].sum(), "the widening part is removed"
    assert not cut[min(labelled):max(labelled) + 1].any(), "never between the labelled slices"
    assert not (cut & (ref == 2)).any()
    targets, info = teacher_pseudo_labels(_probs_from(torch.from_numpy(fake), 3),
                                          TransferSet.build(full.with_labelled(labelled)), threshold=0.9)
    assert (targets[tip + 2 * out][torch.from_numpy(mask[tip + 2 * out])] == 0).all()
    assert info["removed_by_3d_filter"][2] >= int(mask[tip + 2 * out].sum())
    real = torch.from_numpy(ref == 2)
    assert (targets[real] == 2).float().mean() > 0.99
    kept, _ = teacher_pseudo_labels(_probs_from(torch.from_numpy(fake), 3),
                                    TransferSet.build(full.with_labelled(labelled)), threshold=0.9, organ_ends=False)
    assert (kept[tip + 2 * out][torch.from_numpy(mask[tip + 2 * out])] == 2).all()  # off: kept


def test_pseudo_distillation_learns_the_small_organ_and_stops_on_evidence(full64, tmp_path):
    """Teacher = the reference labels (a perfect teacher); 3 labelled slices. The student must
    fit the labels and agree with the teacher on the unlabelled slices, for the spleen too."""
    lab = full64.labels
    spleen = np.flatnonzero((lab == 2).flatten(1).any(1).numpy())
    picks = sorted({int(spleen[len(spleen) // 4]), int(spleen[len(spleen) // 2]), int(spleen[3 * len(spleen) // 4])})
    transfer = TransferSet.build(full64.with_labelled(picks))
    cache = TeacherCache(_probs_from(lab, 3), None)
    cfg = DistillConfig(steps=400, finetune_steps=10, batch_size=4, lr=3e-3, seed=0, log_every=20,
                        val_every=20, min_steps=60, patience=2, fit_target=0.8, min_delta=0.01)
    events = []
    r = distill(transfer, cfg, cache, "unet-s", checkpoint_dir=tmp_path / "d", progress=NullProgress(events.append))
    m = r.metrics
    assert m["stopped_by"] in ("converged", "steps") and m["distill_steps"] <= 400
    fit = m["final_check"]["fit"]
    agreement = m["final_check"]["agreement"]
    assert min(fit) >= 0.8, fit
    assert agreement[1] > 0.6, agreement  # spleen learnt from the teacher on unlabelled slices
    assert any("fit" in h and "agreement" in h for h in r.history)
    assert r.history[-1]["phase"] == "finetune" and m["steps"] == m["distill_steps"] + 10
    gate = quality_gate(CT2, fit, agreement, [0.9, 0.9])
    assert set(gate) == {"passed", "warnings", "fit", "agreement"}
    saved = json.loads((tmp_path / "d" / "result.json").read_text())
    assert saved["metrics"]["distill_steps"] == m["distill_steps"]


def test_early_stop_state_survives_resume(full64, tmp_path):
    transfer = TransferSet.build(full64.with_labelled([5, 10, 14]))
    cache = TeacherCache(_probs_from(full64.labels, 3), None)
    cfg = DistillConfig(steps=12, finetune_steps=2, batch_size=2, seed=1, val_every=3, min_steps=3,
                        patience=1, fit_target=0.0, min_delta=0.5, checkpoint_every=3, log_every=1)
    ref = distill(transfer, cfg, cache, "unet-s", checkpoint_dir=tmp_path / "a")
    assert ref.metrics["stopped_by"] == "converged" and ref.metrics["distill_steps"] < 12

    class Kill(Exception):
        pass

    def killer(event):
        if event["event"] == "progress" and event["step"] == ref.metrics["distill_steps"] + 1:
            raise Kill()
    with pytest.raises(Kill):
        distill(transfer, cfg, cache, "unet-s", checkpoint_dir=tmp_path / "b", progress=NullProgress(killer))
    resumed = distill(transfer, cfg, cache, "unet-s", checkpoint_dir=tmp_path / "b")
    assert resumed.metrics["distill_steps"] == ref.metrics["distill_steps"]
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_evidence_waits_for_passes_over_a_larger_transfer_set(full64, tmp_path):
    """``min_epochs``: a transfer set of several scans trains as long per slice as one scan before
    evidence may stop it (one CHAOS scan ~40 slices: 600 steps; three scans ~114: all 1400)."""
    fast = DistillConfig.preset("fast")
    assert fast.evidence_after(40) == 600 and fast.evidence_after(100) == 1250 and fast.evidence_after(114) == 1400
    assert DistillConfig(steps=1400, min_steps=600).evidence_after(114) == 600  # min_epochs 0: off
    transfer = TransferSet.build(full64.with_labelled([5, 10, 14]))
    cache = TeacherCache(_probs_from(full64.labels, 3), None)
    base = {"steps": 30, "finetune_steps": 2, "batch_size": 2, "seed": 1, "val_every": 3, "min_steps": 3,
            "patience": 1, "fit_target": 0.0, "min_delta": 0.5, "log_every": 1}
    early = distill(transfer, DistillConfig(**base), cache, "unet-s").metrics
    cfg = DistillConfig(**base, min_epochs=1.0)
    after = cfg.evidence_after(len(transfer))
    assert after == min(30, math.ceil(len(transfer) / 2)) and after > early["distill_steps"]
    events = []
    m = distill(transfer, cfg, cache, "unet-s", checkpoint_dir=tmp_path / "d", progress=NullProgress(events.append)).metrics
    assert m["evidence_after"] == after and after <= m["distill_steps"] <= 30
    assert any(e["event"] == "log" and f"after step {after}" in e["message"] for e in events)
    assert m["stopped_by"] in ("converged", "steps")


def test_quality_gate_names_the_class_and_the_reason():
    ok = quality_gate(["liver", "spleen"], [0.95, 0.9], [0.93, 0.9], [0.95, 0.9])
    assert ok["passed"] and ok["warnings"] == []
    bad = quality_gate(["liver", "kidney_right"], [0.95, 0.09], [0.93, 0.3], [0.96, 0.9])
    assert not bad["passed"] and len(bad["warnings"]) == 2
    assert "'kidney_right'" in bad["warnings"][0] and "0.09" in bad["warnings"][0]
    assert "worse than the fine-tuned teacher" in bad["warnings"][1]
    nan = quality_gate(["a", "b"], [0.9, math.nan], None, None)  # a class not labelled: no verdict
    assert nan["passed"] and nan["fit"]["b"] is None


def test_adjacent_labelled_slices_are_flagged():
    from TSKDLib.pipeline.run import adjacent_slices_warning

    msg = adjacent_slices_warning([10, 11, 12], 40)
    assert msg and "10-12" in msg and "adjacent" in msg
    assert adjacent_slices_warning([10, 20, 30], 40) is None  # spread out
    assert adjacent_slices_warning([3, 4], 40) is None  # too few to judge
    assert adjacent_slices_warning([0, 1, 2, 3], 6) is None  # most of a short scan


def test_sparse_benchmark_runs_every_student_method_on_a_real_scan(ct_case, tmp_path):
    """The whole sparse-slice protocol on the bundled CT (tiny budgets, 64 px): every method of
    the issue side by side on the same labels, scored per region; the teacher is refit on all
    labelled slices."""
    import csv

    from TSKDLib.evaluation.sparse_benchmark import SparseConfig, run_sparse_benchmark

    pytest.importorskip("itk")
    methods = ["fill_between", "teacher", "scratch", "task_agnostic", "tskd_nosyn"]
    cfg = SparseConfig(methods=methods, size=64, other_scans=False, work_dir=str(tmp_path / "work"),
                       teacher={"steps": 2, "val_every": 1, "batch_size": 2},
                       distillation={"steps": 20, "finetune_steps": 2, "min_steps": 10, "val_every": 10,
                                     "batch_size": 2})
    out = run_sparse_benchmark([ct_case], cfg, tmp_path / "out", NullProgress())
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert rows and {r["method"] for r in rows} == set(methods) | {m + "+post" for m in methods if m != "fill_between"}
    assert {r["region"] for r in rows} == {"within", "between", "outside"}
    assert {r["class"] for r in rows} == {"liver", "spleen"}
    dice = {(r["method"], r["region"], r["class"]): float(r["dice"]) for r in rows}
    assert all(0.0 <= d <= 1.0 for d in dice.values())
    assert dice["fill_between", "between", "liver"] > 0.8  # interpolation between drawn liver slices
    assert dice["fill_between", "outside", "liver"] < dice["fill_between", "between", "liver"]
    meta = json.loads(next((tmp_path / "work").glob("*/teacher/teacher.json")).read_text())
    n_labelled = len(sparse_slice_indices(ct_case.label_slices(), 2, 3))
    assert meta["validation"]["refit_slices"] == n_labelled and meta["validation"]["n_slices"] >= 1
    assert (tmp_path / "out" / "dice_per_organ.png").is_file() and out["summary"]


def test_sparse_benchmark_keeps_the_methods_it_finished_when_stopped(ct_case, tmp_path, monkeypatch):
    """A run stopped during a student's distillation (a deadline, a lost GPU lease) still has the
    teacher's rows in results.csv / results.md: the tables are written after each method."""
    import csv

    import TSKDLib.distillation.distill as distill_module
    from TSKDLib.evaluation.sparse_benchmark import SparseConfig, run_sparse_benchmark

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_module, "distill", stopped)
    cfg = SparseConfig(methods=["teacher", "tskd_nosyn"], size=64, other_scans=False,
                       teacher={"steps": 2, "val_every": 1, "batch_size": 2})
    with pytest.raises(KeyboardInterrupt):
        run_sparse_benchmark([ct_case], cfg, tmp_path / "out", NullProgress())
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert {r["method"] for r in rows} == {"teacher", "teacher+post"}
    import torch

    md = (tmp_path / "out" / "results.md").read_text()
    assert "| teacher |" in md
    assert f'"torch": "{torch.__version__}"' in md  # the figures name the tools that produced them


# ------------------------------------------------------------------------------------------------
# MR intensity augmentation (issue 15: new scans)
# ------------------------------------------------------------------------------------------------
def test_mr_intensity_augment_is_a_smooth_field_and_a_window(full64):
    from TSKDLib.distillation.distill import mr_intensity_augment

    img = full64.images[8:12].clone().clamp(min=0.05)  # real CT slices, no zero to divide by
    out = mr_intensity_augment(torch.Generator().manual_seed(0), img, window_low=0.0, window_high=0.0, p=1.0)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    ratio = (out / img)[..., 8:56, 8:56]  # the bias field exp(f), where nothing was clamped
    inside = (out[..., 8:56, 8:56] < 1) & (out[..., 8:56, 8:56] > 0)
    step = (ratio[..., 1:, :] - ratio[..., :-1, :]).abs()[inside[..., 1:, :] & inside[..., :-1, :]]
    assert ratio[inside].std() > 0.05, "a bias field varies across the slice"
    assert step.median() < 0.02, "... smoothly (a 4 x 4 grid, bicubic)"
    again = mr_intensity_augment(torch.Generator().manual_seed(0), img, window_low=0.0, window_high=0.0, p=1.0)
    assert torch.equal(out, again)  # drawn from the step's generator only (resume gives the same batches)
    win = mr_intensity_augment(torch.Generator().manual_seed(1), img, bias_sd=0.0, p=1.0)
    a = img[img < 0.6]
    b = win[img < 0.6]
    slope = ((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()) ** 2).sum()
    assert abs(float(slope) - 1) > 0.01, "the window changes contrast"


def test_mr_augment_follows_the_scans_normalisation(data_dir, ct_case):
    """On for percentile-normalised scans (MR), off for CT windows, unless set; the slice set
    keeps the normalisation kind through save/load and subsets."""
    import warnings

    from TSKDLib.data.case import load_case
    from TSKDLib.data.geometry import LabelGeometryWarning

    ts = data_dir / "totalseg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelGeometryWarning)
        mr_case = load_case(ts / "example_mr_sm.nii.gz", ts / "example_seg_mr.nii.gz",
                            ts / "label_map_total_mr.json", classes=["liver", "spleen"])
    mr = prepare_slices([mr_case], 32).with_labelled([8, 12])
    ct = prepare_slices([ct_case], 32).with_labelled([8, 12])
    assert (mr.intensity, ct.intensity) == ("percentile", "window")
    got = {}
    for name, slices in (("mr", mr), ("ct", ct)):
        for setting in (None, False, True):
            cfg = DistillConfig(method="scratch", steps=2, finetune_steps=1, batch_size=2, val_every=1,
                                min_steps=1, mr_augment=setting)
            res = distill(TransferSet.build(slices), cfg, student="unet-s", progress=NullProgress())
            got[name, setting] = res.metrics["mr_augment"]
    assert got == {("mr", None): True, ("mr", False): False, ("mr", True): True,
                   ("ct", None): False, ("ct", False): False, ("ct", True): True}
    assert mr.subset([0, 1]).intensity == "percentile"


def test_slice_set_keeps_its_normalisation_kind(ct_case, tmp_path):
    from TSKDLib.data.case import SliceSet

    s = prepare_slices([ct_case], 32)
    s.save(tmp_path / "slices.pt")
    assert SliceSet.load(tmp_path / "slices.pt").intensity == "window"
