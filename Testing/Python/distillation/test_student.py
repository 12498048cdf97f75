"""Students, distillation, model packages and whole-scan inference on the real bundled data.

Budgets are tiny (S = 64/128, tens of steps). The stand-in teacher in the distillation test gives
soft probabilities derived from the reference labels of *all* slices (a teacher that knows the
task), so the test checks that distillation transfers a teacher's knowledge on unlabelled slices
to the student; the real LiteMedSAM teacher is exercised by benchmarks/bench_student.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from conftest import HC18, ROOT, TOTALSEG
from TSKDLib import ModelPackageError, RunExistsError
from TSKDLib.data.case import load_2d_cases, prepare_case_slices, prepare_slices
from TSKDLib.distillation.distill import (DistillConfig, TransferSet, build_teacher_cache, dice_scores,
                             distill, evaluate_dice, feature_kd_loss, method_config, output_kd_loss)
from TSKDLib.errors import CheckpointError, ConfigError
from TSKDLib.deploy.export import export_model_package
from TSKDLib.deploy.inference import (Cleanup, NumpyResizer, cleanup_labels,
                               load_model_package, segment_file, segment_image)
from TSKDLib.data.preprocess import SliceResizer
from TSKDLib.pipeline.progress import NullProgress
from TSKDLib.distillation.student import build_student, count_flops, load_student, save_student

CT2 = ["liver", "spleen"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Before any other fixture of the module (autouse): one torch thread (root conftest)."""


def _gt_teacher(images_all, labels_all, k1):
    """A teacher-like callable: soft one-hot of the reference labels of the slice it is shown."""
    flat = images_all.flatten(1)

    def teacher(x):
        idx = [int(torch.argmin((flat - xi.flatten()).abs().sum(1))) for xi in x]
        probs = F.one_hot(labels_all[idx].clamp(min=0), k1).permute(0, 3, 1, 2).float() * 0.9 + 0.1 / k1
        emb = F.avg_pool2d(probs, probs.shape[-1] // 16).repeat(1, 256 // k1 + 1, 1, 1)[:, :256]
        return emb, probs
    return teacher


# ------------------------------------------------------------------------------------------------
# Students
# ------------------------------------------------------------------------------------------------
def test_students_shapes_sizes_and_errors():
    x = torch.rand(2, 1, 64, 64)
    for arch, max_params in [("unet-s", 0.5e6), ("unet", 1e6), ("unet-l", 2e6), ("vit_tiny", 6e6)]:
        m = build_student(arch, num_classes=3, input_size=64)
        logits, feat = m.forward_features(x)
        assert logits.shape == (2, 4, 64, 64)
        assert feat.shape == (2, m.bottleneck_channels, 4, 4)
        assert torch.equal(m(x), logits) or torch.allclose(m(x), logits, atol=1e-6)
        assert m.num_parameters() < max_params
    assert build_student("unet", 1).num_parameters() < build_student(None, 1).num_parameters() < 2e6  # default unet-l
    assert 1e8 < count_flops(build_student("unet", 1)) < 3e9  # per 256 x 256 slice
    with pytest.raises(ConfigError):
        build_student("resnet")
    with pytest.raises(ConfigError):
        build_student("unet", 1, input_size=100)


def test_student_save_load_roundtrip(tmp_path):
    m = build_student("unet-s", 2, 64)
    save_student(m, tmp_path / "s.pt")
    m2 = load_student(tmp_path / "s.pt")
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), m2.eval()(x))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_student(tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------------------
# Losses and cache
# ------------------------------------------------------------------------------------------------
def test_kd_losses_zero_at_match_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=g)
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    probs = torch.softmax(logits, 1)
    for t in (1.0, 2.0, 4.0):
        assert float(output_kd_loss(logits, probs, valid, t)) < 1e-5
        assert float(output_kd_loss(logits.flip(1), probs, valid, t)) > 1e-2
    assert float(output_kd_loss(logits.flip(1), probs, valid, 2.0, "bce")) > \
        float(output_kd_loss(logits, probs, valid, 2.0, "bce"))
    # padding pixels are ignored
    valid2 = valid.clone()
    valid2[:, :, 8:] = False
    wrong = logits.clone()
    wrong[..., 8:] = -wrong[..., 8:]
    assert float(output_kd_loss(wrong, probs, valid2, 2.0)) < 1e-5
    emb = torch.randn(2, 256, 64, 64, generator=g)
    pooled = F.adaptive_avg_pool2d(emb, 16)
    assert float(feature_kd_loss(pooled, emb)) < 1e-5 and float(feature_kd_loss(pooled, emb, "mse")) < 1e-10
    assert float(feature_kd_loss(-pooled, emb)) > 1.9


def test_teacher_cache_disk_reuse_and_order(tmp_path):
    images = torch.rand(7, 1, 32, 32)
    calls = []

    def teacher(x):
        calls.append(len(x))
        logits = x.repeat(1, 2, 1, 1) * torch.tensor([1.0, -1.0])[None, :, None, None]
        class Out:
            embedding = x.mean((1, 2, 3))[:, None, None, None].expand(-1, 256, 64, 64)
        o = Out()
        o.logits = logits
        return o
    cache = build_teacher_cache(teacher, images, batch_size=3, directory=tmp_path / "c")
    assert sum(calls) == 7 and cache.probs.shape == (7, 3, 32, 32) and cache.embedding.shape == (7, 256, 64, 64)
    assert isinstance(cache.probs, np.memmap) and cache.probs.dtype == np.float16
    probs, emb = cache.take(np.array([5, 0, 5, 2]))
    assert torch.allclose(probs.sum(1), torch.ones(4, 32, 32), atol=1e-2)
    assert torch.allclose(emb[:, 0, 0, 0], images[[5, 0, 5, 2]].mean((1, 2, 3)), atol=1e-3)
    again = build_teacher_cache(teacher, images, directory=tmp_path / "c")  # resume: no teacher call
    assert sum(calls) == 7 and len(again) == 7
    emb_only = build_teacher_cache(lambda x: torch.zeros(len(x), 256, 64, 64), images, with_probs=False)
    assert emb_only.probs is None and emb_only.embedding.shape == (7, 256, 64, 64)
    with pytest.raises(ConfigError):
        build_teacher_cache(lambda x: torch.zeros(len(x), 256, 64, 64), images)


# ------------------------------------------------------------------------------------------------
# Distillation
# ------------------------------------------------------------------------------------------------
def test_distillation_beats_scratch_on_real_slices():
    """HC18: 2 labelled images, 14 unlabelled ones in the transfer set; test on the unlabelled."""
    cases = load_2d_cases(HC18 / "images", HC18 / "masks", HC18 / "labels.json",
                          names=[f"{i:03d}_HC" for i in range(16)])
    full = prepare_slices(cases, 64)
    train = full.with_labelled([0, 1])
    transfer = TransferSet.build(train)
    assert transfer.summary()["labelled"] == 2 and transfer.summary()["unlabelled"] == 14
    cache = build_teacher_cache(_gt_teacher(full.images, full.labels, 2), transfer.images)
    test_imgs, test_labels = full.images[2:], full.labels[2:]
    base = DistillConfig(steps=60, finetune_steps=20, batch_size=8, lr=3e-3, seed=0, log_every=10,
                         w_feat=0.2, labelled_fraction=0.25)
    scores = {}
    for method in ("scratch", "tskd"):
        r = distill(transfer, method_config(method, base), cache if method != "scratch" else None, "unet-s",
                    validation=(test_imgs, test_labels))
        scores[method] = evaluate_dice(r.model, test_imgs, test_labels, per_slice=True)["mean"]
        pooled = evaluate_dice(r.model, test_imgs, test_labels)["mean"]
        assert r.history[-1]["step"] == 80 and r.metrics["val_dice"]["mean"] == pytest.approx(pooled, abs=1e-6)
    print(scores)
    assert scores["tskd"] > scores["scratch"] + 0.1, scores


def test_task_agnostic_and_cache_requirements(ct_case):
    slices = prepare_slices([ct_case], 64).with_labelled([3])
    transfer = TransferSet.build(slices, synthetic_images=torch.rand(2, 1, 64, 64))
    assert transfer.summary() == {"slices": 22, "labelled": 1, "unlabelled": 19, "synthetic": 2, "size": 64}
    emb_only = build_teacher_cache(lambda x: torch.randn(len(x), 256, 64, 64), transfer.images, with_probs=False)
    with pytest.raises(ConfigError):
        distill(transfer, DistillConfig(method="tskd", steps=2, finetune_steps=0), emb_only, "unet-s")
    with pytest.raises(ConfigError):
        distill(transfer, DistillConfig(method="tskd", steps=2), None, "unet-s")
    r = distill(transfer, DistillConfig(method="task_agnostic", steps=3, finetune_steps=2, batch_size=2,
                                        log_every=1), emb_only, "unet-s")
    assert [h["phase"] for h in r.history] == ["distill"] * 3 + ["finetune"] * 2
    assert all("kd_feat" in h and "kd_out" not in h for h in r.history[:3])
    assert all("kd_feat" not in h for h in r.history[3:])


def test_checkpoint_resume_gives_same_weights(tmp_path, ct_case):
    slices = prepare_slices([ct_case], 64).with_labelled([2, 12])
    transfer = TransferSet.build(slices)
    cache = build_teacher_cache(_gt_teacher(slices.images, prepare_slices([ct_case], 64).labels, 3), transfer.images)
    cfg = DistillConfig(steps=4, finetune_steps=2, batch_size=2, checkpoint_every=2, log_every=1, seed=3)
    ref = distill(transfer, cfg, cache, "unet-s", checkpoint_dir=tmp_path / "a")

    class Kill(Exception):
        pass

    def killer(event):
        if event["event"] == "progress" and event["step"] == 5:
            raise Kill()
    with pytest.raises(Kill):
        distill(transfer, cfg, cache, "unet-s", checkpoint_dir=tmp_path / "b", progress=NullProgress(killer))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 4
    events = []
    resumed = distill(transfer, cfg, cache, "unet-s", checkpoint_dir=tmp_path / "b",
                      progress=NullProgress(events.append))
    assert [e["step"] for e in events if e["event"] == "progress"] == [5, 6]
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert load_student(tmp_path / "b" / "student.pt").state_dict().keys() == ref.model.state_dict().keys()
    with pytest.raises(CheckpointError):  # another configuration on the same directory
        distill(transfer, DistillConfig(steps=5, finetune_steps=2, batch_size=2), cache, "unet-s",
                checkpoint_dir=tmp_path / "b")


# ------------------------------------------------------------------------------------------------
# Export and inference
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_package(tmp_path_factory, ct_case):
    """A briefly trained student on the CT (S = 128), exported."""
    torch.set_num_threads(1)
    slices = prepare_slices([ct_case], 128).with_labelled([4, 15])
    r = distill(TransferSet.build(slices), DistillConfig(method="scratch", steps=60, finetune_steps=10,
                                                         batch_size=4, seed=1), None, "unet-s")
    _, _, _, norm = prepare_case_slices(ct_case, 128)
    out = tmp_path_factory.mktemp("pkg") / "ct_model"
    export_model_package(r.model, out, ct_case.class_map, norm, slice_axis="axial", training=r.training_summary(),
                         validation={"dice": r.metrics.get("val_dice", {})}, teacher={"backend": "none"})
    return out, r.model


def test_onnx_matches_pytorch_and_card(ct_package, ct_case):
    path, model = ct_package
    pkg = load_model_package(path)
    x = torch.rand(3, 1, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(pkg.predict_logits(x.numpy()) - ref).max() < 1e-4
    ts = torch.jit.load(str(path / "model.ts"))
    with torch.no_grad():
        assert np.abs(ts(x).numpy() - ref).max() < 1e-4
    card = json.loads((path / "model_card.json").read_text())
    assert card["format"] == "tskd-model" and card["format_version"] == 1
    assert [c["name"] for c in card["classes"]] == CT2 and [c["value"] for c in card["classes"]] == [5, 1]
    assert all(len(c["color"]) == 3 for c in card["classes"])
    assert card["input_size"] == 128 and card["slice_axis"] == "axial"
    assert card["normalization"]["kind"] == "window"
    assert card["student"]["parameters"] == model.num_parameters() and card["student"]["flops_per_slice"] > 0
    assert card["training"]["method"] == "scratch" and "torch" in card["versions"]
    assert set(card["files"]) == {"model.onnx", "model.ts"}
    assert not any(p.name.startswith("ct_model.tmp") for p in path.parent.iterdir())


def test_numpy_resizer_matches_slice_resizer(ct_case):
    rng = np.random.RandomState(0)
    for shape, size, spacing in [((512, 512), 256, (0.98, 0.98)), ((540, 800), 256, (1.0, 1.0)),
                                 ((101, 122), 256, (3.0, 3.0)), ((30, 122), 128, (3.0, 3.0))]:
        tr, nr = SliceResizer.create(shape, size, spacing), NumpyResizer.create(shape, size, spacing)
        assert (tr.new_shape, tr.pad) == (nr.new_shape, nr.pad)
        x = rng.rand(2, *shape).astype(np.float32)
        assert np.abs(nr.to_model(x) - tr.to_model(torch.from_numpy(x)).numpy()).max() < 1e-5
        # smooth logits with class boundaries (as a network gives)
        logits = F.avg_pool2d(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 5,
                              9, 1, 4).numpy()
        ref = tr.from_model(torch.from_numpy(logits)).argmax(1).numpy()
        assert (nr.labels_from_logits(logits) == ref).mean() > 0.9999


def test_segment_geometry_formats_and_agreement(ct_package, ct_case, tmp_path):
    path, model = ct_package
    pkg = load_model_package(path)
    img = ct_case.image
    labels = segment_image(pkg, TOTALSEG / "ct_dicom")
    assert labels.GetSize() == img.GetSize()
    assert labels.GetSpacing() == img.GetSpacing() and labels.GetOrigin() == img.GetOrigin()
    assert labels.GetDirection() == img.GetDirection()
    # same labels as the PyTorch path (data layer resize + Case.to_original)
    images, _, resizer, _ = prepare_case_slices(ct_case, 128)
    with torch.no_grad():
        ref = resizer.from_model(model(images)).argmax(1).numpy()
    ref_arr = sitk.GetArrayFromImage(ct_case.to_original(ref))
    got = sitk.GetArrayFromImage(labels)
    assert (got == ref_arr).mean() > 0.9999
    # the short-trained student finds the liver where the reference has it
    gt = sitk.GetArrayFromImage(ct_case.labels)
    assert dice_scores(torch.from_numpy(got.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)), 2)["per_class"][0] > 0.5
    # every output format, read back
    for name in ("out.nii.gz", "out.nrrd", "out.seg.nrrd"):
        segment_file(pkg, TOTALSEG / "ct_dicom", tmp_path / name)
        if name.endswith(".seg.nrrd"):
            import slicerio
            seg = slicerio.read_segmentation(str(tmp_path / name))
            assert [s["name"] for s in seg["segments"]] == CT2
            assert [tuple(round(c * 255) for c in s["color"]) for s in seg["segments"]] == pkg.class_map.colors
        else:
            back = sitk.ReadImage(str(tmp_path / name))
            assert back.GetSize() == img.GetSize()
            assert np.allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
            assert np.allclose(back.GetDirection(), img.GetDirection(), atol=1e-6)
            assert np.array_equal(sitk.GetArrayFromImage(back), pkg.class_map.to_values(got))
    with pytest.raises(RunExistsError):
        segment_file(pkg, TOTALSEG / "ct_dicom", tmp_path / "out.nii.gz")


def test_segment_other_orientation_and_2d(ct_package, tmp_path):
    pkg = load_model_package(ct_package[0])
    img = sitk.ReadImage(str(TOTALSEG / "example_ct_sm.nii.gz"), sitk.sitkFloat32)
    flipped = sitk.Flip(img, [True, False, True])
    a = segment_image(pkg, img)
    b = segment_image(pkg, flipped)
    assert b.GetSize() == flipped.GetSize() and b.GetDirection() == flipped.GetDirection()
    assert b.GetOrigin() == flipped.GetOrigin()
    # same anatomy -> same labels once flipped back
    assert np.array_equal(sitk.GetArrayFromImage(sitk.Flip(b, [True, False, True])), sitk.GetArrayFromImage(a))
    png = segment_image(pkg, HC18 / "images" / "000_HC.png")
    assert png.GetSize() == (800, 540, 1)


def test_slice_review_numbers_file_slices_and_estimates_wrong_area(ct_package, ct_case):
    """The slices ``tskd segment`` tells a user to check: numbered like the file (a scan stored
    head-first and feet-first gets mirrored numbers), ranked by the expected wrong area in mm^2,
    which equals the PyTorch student's. (Whether the picks hold the errors is measured on real
    new scans by benchmarks/review_slices.py: this briefly trained student is unsure everywhere.)"""
    path, model = ct_package
    pkg = load_model_package(path)
    img = ct_case.image
    n = img.GetSize()[2]
    clean = Cleanup.segment_default()
    found, mirrored = {}, {}
    segment_image(pkg, img, cleanup=clean, review=found)
    segment_image(pkg, sitk.Flip(img, [False, False, True]), cleanup=clean, review=mirrored)
    a, b = found["slices"], mirrored["slices"]
    assert sorted(a.file_slices.tolist()) == list(range(n))
    score_a = dict(zip(a.file_slices.tolist(), a.uncertain_mm2))
    score_b = dict(zip(b.file_slices.tolist(), b.uncertain_mm2))
    assert all(np.isclose(score_a[k], score_b[n - 1 - k], rtol=1e-4, atol=1e-3) for k in range(n))
    assert b.worst(3) == [n - 1 - k for k in a.worst(3)]
    picks = a.worst(3)
    assert len(picks) == 3 and all(abs(p - q) >= 3 for p in picks for q in picks if p != q)
    assert [score_a[p] for p in picks] == sorted((score_a[p] for p in picks), reverse=True)
    assert a.worst(3, gap=1) == sorted(score_a, key=lambda k: -score_a[k])[:3]
    # slices corrected already are never named; the next best take their place
    assert a.worst(2, gap=1, exclude=picks[:1]) == [k for k in sorted(score_a, key=lambda k: -score_a[k])
                                                    if k != picks[0]][:2]
    # expected wrong area: at most the slice's area x (1 - 1/(K+1)) (K+1 = 3 classes here)
    sx, sy = img.GetSpacing()[:2]
    area = img.GetSize()[0] * img.GetSize()[1] * sx * sy
    assert (a.uncertain_mm2 >= 0).all() and (a.uncertain_mm2 <= area * 2 / 3 + 1e-3).all()
    raw = {}
    segment_image(pkg, img, review=raw)  # the estimate is the model's, before any clean-up
    assert np.allclose(raw["slices"].uncertain_mm2, a.uncertain_mm2)
    # the same estimate from the PyTorch student: sum of 1 - max softmax over the unpadded model
    # grid, times the native area of one model pixel (frame order = the review's order)
    images, _, resizer, _ = prepare_case_slices(ct_case, 128)
    (t, l), (h, w) = resizer.pad, resizer.new_shape
    with torch.no_grad():
        prob = torch.softmax(model(images), 1)[:, :, t:t + h, l:l + w]
    expected = (1 - prob.max(1).values).sum((1, 2)).numpy() * area / (h * w)
    assert np.allclose(a.uncertain_mm2, expected, rtol=1e-3)


def test_package_written_reloaded_identical_and_overwrite(ct_package, tmp_path, ct_case):
    path, model = ct_package
    labels1 = sitk.GetArrayFromImage(segment_image(load_model_package(path), TOTALSEG / "example_ct_sm.nii.gz"))
    _, _, _, norm = prepare_case_slices(ct_case, 128)
    copy = tmp_path / "copy"
    export_model_package(model, copy, ct_case.class_map, norm, torchscript=False)
    labels2 = sitk.GetArrayFromImage(segment_image(load_model_package(copy), TOTALSEG / "example_ct_sm.nii.gz"))
    assert np.array_equal(labels1, labels2)
    with pytest.raises(RunExistsError):
        export_model_package(model, copy, ct_case.class_map, norm)
    before = json.loads((copy / "model_card.json").read_text())["created"]
    export_model_package(model, copy, ct_case.class_map, norm, overwrite=True, name="again")
    assert json.loads((copy / "model_card.json").read_text())["name"] == "again" and before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def _copy_pkg(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_corrupt_or_incomplete_package_is_a_clear_error(ct_package, tmp_path):
    src = ct_package[0]
    with pytest.raises(ModelPackageError, match="not found"):
        load_model_package(tmp_path / "nothing")
    p = _copy_pkg(src, tmp_path / "nocard")
    (p / "model_card.json").unlink()
    with pytest.raises(ModelPackageError, match="model_card.json"):
        load_model_package(p)
    p = _copy_pkg(src, tmp_path / "badjson")
    (p / "model_card.json").write_text("{not json")
    with pytest.raises(ModelPackageError, match="JSON"):
        load_model_package(p)
    for key, value, msg in [("format", "other", "not a TSKD"), ("format_version", 99, "version")]:
        p = _copy_pkg(src, tmp_path / f"bad_{key}")
        card = json.loads((p / "model_card.json").read_text())
        card[key] = value
        (p / "model_card.json").write_text(json.dumps(card))
        with pytest.raises(ModelPackageError, match=msg):
            load_model_package(p)
    p = _copy_pkg(src, tmp_path / "noonnx")
    (p / "model.onnx").unlink()
    with pytest.raises(ModelPackageError, match="model.onnx"):
        load_model_package(p)
    p = _copy_pkg(src, tmp_path / "truncated")
    data = (p / "model.onnx").read_bytes()
    (p / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelPackageError, match="corrupt"):
        load_model_package(p)
    with pytest.raises(ModelPackageError, match="onnxruntime"):
        load_model_package(p, verify=False)
    p = _copy_pkg(src, tmp_path / "classes")
    card = json.loads((p / "model_card.json").read_text())
    card["classes"] = card["classes"][:1]
    (p / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match="channels"):
        load_model_package(p)


def test_inference_needs_no_torch(ct_package, tmp_path):
    code = (
        "import sys\n"
        "import TSKDLib.deploy.inference as inf\n"
        f"inf.segment_file({str(ct_package[0])!r}, {str(TOTALSEG / 'example_ct_sm.nii.gz')!r}, "
        f"{str(tmp_path / 'o.seg.nrrd')!r}, cleanup=inf.Cleanup(min_island_mm3=50, fill_holes=True))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_cleanup_removes_islands_keeps_largest_fills_holes(ct_case):
    gt = sitk.GetArrayFromImage(ct_case.labels).astype(np.uint8)  # (z, y, x), liver 1, spleen 2
    noisy = gt.copy()
    noisy[5:7, 10:13, 10:13] = 1  # a small liver island far from the liver
    zz, yy, xx = np.nonzero(gt == 1)
    cz, cy, cx = int(np.median(zz)), int(np.median(yy)), int(np.median(xx))
    assert (gt[cz - 2:cz + 3, cy - 2:cy + 3, cx - 2:cx + 3] == 1).all()
    noisy[cz - 1:cz + 2, cy - 1:cy + 2, cx - 1:cx + 2] = 0  # a hole inside the liver
    spacing = ct_case.image.GetSpacing()[::-1]
    out = cleanup_labels(noisy, 2, spacing, Cleanup(min_island_mm3=100.0))
    assert (out[5:7, 10:13, 10:13] == 0).all() and (out[cz, cy, cx] == 0)
    out = cleanup_labels(noisy, 2, spacing, Cleanup(largest_component=True, fill_holes=True))
    assert (out[5:7, 10:13, 10:13] == 0).all() and out[cz, cy, cx] == 1
    assert np.array_equal(out == 2, gt == 2)  # other class untouched
    assert cleanup_labels(noisy, 2, spacing, None) is noisy
    island = noisy.copy()
    sz, sy, sx = (int(np.median(v)) for v in np.nonzero(gt == 2))
    island[5:7, 10:13, 10:13] = 1
    island[0:2, 0:3, 0:3] = 2  # a spleen island in a corner
    out = cleanup_labels(island, 2, spacing, Cleanup(single_object=(1,)))  # liver is one object
    assert (out[5:7, 10:13, 10:13] == 0).all() and (out[0:2, 0:3, 0:3] == 2).all()
    assert out[sz, sy, sx] == 2 and Cleanup(single_object=(1,)).active
    # a second part of at least a fifth of the largest stays (it may be the real organ)
    big = island.copy()
    side = int(np.ceil(np.sqrt(0.3 * int((gt == 1).sum()) / gt.shape[0])))  # a slab of 30 % of the liver
    big[:, -side:, -side:] = 1
    assert not (gt[:, -side - 1:, -side - 1:] == 1).any()
    out = cleanup_labels(big, 2, spacing, Cleanup(single_object=(1,)))
    assert (out[:, -side:, -side:] == 1).all() and (out[5:7, 10:13, 10:13] == 0).all()
    out = cleanup_labels(big, 2, spacing, Cleanup(single_object=(1,), single_object_fraction=0.5))
    assert (out[:, -side:, -side:] == 0).all()
