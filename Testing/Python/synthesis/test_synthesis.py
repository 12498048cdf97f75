"""Synthesis stage (issue 4) on the real bundled CT: tiny diffusion training, sampling,
reproducibility, resumption, teacher labelling, transfer-set storage, and the guarantee that
synthetic slices never act as ground truth.

Budgets are tiny (32 px diffusion model, tens of steps) so the file runs in about a minute on 2
CPU cores; image quality is not tested here (see benchmarks/bench_synthesis.py)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from conftest import CT_CLASSES
from TSKDLib import ConfigError, ModelPackageError
from TSKDLib.data.case import load_case, prepare_slices
from TSKDLib.data.geometry import LabelGeometryWarning
from TSKDLib.pipeline.progress import NullProgress
from TSKDLib.synthesis import (IntensityTeacher, SynthesisConfig, SyntheticTransferSet, condition_pool,
                               generate, intensity_histogram_distance, label_images, make_condition,
                               run_synthesis, teacher_confidence, train_diffusion)

S = 64  # teacher input size in these tests (the diffusion model runs at 32 and is upsampled)


def tiny(**overrides) -> SynthesisConfig:
    base = dict(resolution=32, block_out_channels=(16, 32), layers_per_block=1, train_steps=40,
                batch_size=8, learning_rate=2e-3, warmup_steps=5, ema_decay=0.9, checkpoint_every=10,
                sample_steps=4, num_images=6, sample_batch_size=4, label_batch_size=4, device="cpu",
                seed=3, num_threads=1)
    base.update(overrides)
    return SynthesisConfig.from_dict(base)


@pytest.fixture(scope="module")
def ct_slices(dicom_dir, dicom_labels, ct_label_map, torch_threads):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelGeometryWarning)
        case = load_case(dicom_dir, dicom_labels, ct_label_map, classes=CT_CLASSES)
    slices = prepare_slices([case], S)
    # make a few slices unlabelled, as in a partially labelled scan
    slices.labels[::3] = -1
    slices.labelled[::3] = False
    return slices


@pytest.fixture(scope="module")
def teacher(ct_slices):
    return IntensityTeacher(ct_slices)


@pytest.fixture(scope="module")
def trained(ct_slices):
    cfg = tiny(train_steps=60)
    return cfg, train_diffusion(ct_slices.images, ct_slices.labels, ct_slices.class_map.num_classes, cfg)


# ------------------------------------------------------------------------------------------------
def test_tiny_training_decreases_loss_and_samples_valid_images(trained, ct_slices):
    cfg, res = trained
    losses = res.losses
    assert len(losses) == 60 and all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-15:])
    assert last < 0.6 * first, (first, last)
    pool, src = condition_pool(ct_slices, cfg.resolution)
    assert len(pool) == int(ct_slices.labelled.sum()) and pool.shape[1:] == (32, 32)
    imgs, seeds, srcs, cmaps = generate(res.model, [0, 1, 2], cfg, S, pool)
    assert imgs.shape == (3, 1, S, S) and imgs.dtype == torch.float32
    assert torch.isfinite(imgs).all() and imgs.min() >= 0 and imgs.max() <= 1
    assert imgs.std() > 0.02  # not a constant image
    assert cmaps.shape == (3, S, S) and all(s is not None for s in srcs)
    assert len(set(seeds)) == 3


def test_same_seed_same_images(trained, ct_slices):
    cfg, res = trained
    pool, _ = condition_pool(ct_slices, cfg.resolution)
    a = generate(res.model, [0, 1, 4], cfg, S, pool)[0]
    b = generate(res.model, [4], cfg, S, pool)[0]  # image 4 alone, in another batch
    c = generate(res.model, [0, 1, 4], cfg, S, pool)[0]
    assert torch.equal(a, c)
    assert torch.allclose(a[2], b[0], atol=1e-4)
    assert not torch.allclose(a[0], a[1], atol=1e-2)
    other = generate(res.model, [0], cfg.replace(seed=4), S, pool)[0]
    assert not torch.allclose(a[0], other[0], atol=1e-2)


def test_training_resumes_exactly_after_interruption(ct_slices, tmp_path):
    cfg = tiny(train_steps=12, checkpoint_every=5)
    k = ct_slices.class_map.num_classes
    ref = train_diffusion(ct_slices.images, ct_slices.labels, k, cfg, tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_at_8(step, loss):
        if step == 8:
            raise Killed

    with pytest.raises(Killed):
        train_diffusion(ct_slices.images, ct_slices.labels, k, cfg, tmp_path / "b", kill_at_8)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5  # the last atomic checkpoint before the kill
    res = train_diffusion(ct_slices.images, ct_slices.labels, k, cfg, tmp_path / "b")
    assert res.resumed_from == 5
    assert res.losses == pytest.approx(ref.losses, rel=1e-5, abs=1e-6)
    for p, q in zip(res.model.unet.parameters(), ref.model.unet.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_condition_channels():
    labels = torch.tensor([[[0, 1], [2, 0]], [[-1, -1], [-1, -1]]])
    cond = make_condition(labels, 2)
    assert cond.shape == (2, 3, 2, 2)
    assert cond[0, 0].tolist() == [[0, 1], [0, 0]] and cond[0, 1].tolist() == [[0, 0], [1, 0]]
    assert cond[0, 2].eq(1).all() and cond[1].eq(0).all()  # unlabelled -> empty condition
    dropped = make_condition(labels[:1], 2, given=torch.tensor([False]))
    assert dropped.eq(0).all()


# ------------------------------------------------------------------------------------------------
def test_run_synthesis_resumes_stores_and_round_trips(ct_slices, teacher, tmp_path):
    cfg = tiny(train_steps=20, num_images=6, sample_batch_size=3, min_confidence=0.5,
               real_confidence_quantile=None)
    calls = []

    def counting_teacher(x):
        calls.append(x.shape[0])
        return teacher(x)

    class Killed(Exception):
        pass

    def dies_after_first_batch(x):
        if len(calls) >= 1:
            raise Killed
        return counting_teacher(x)

    out = tmp_path / "synthesis"
    with pytest.raises(Killed):
        run_synthesis(ct_slices, dies_after_first_batch, out, cfg)
    parts = list(out.glob("samples-*/part-*.pt"))
    assert len(parts) == 1  # the first batch of 3 was written before the kill
    calls.clear()
    events = []
    ts = run_synthesis(ct_slices, counting_teacher, out, cfg, NullProgress(callback=events.append))
    # only the 3 missing slices were generated and labelled, plus the real reference slices
    assert calls[0] == 3 and sum(calls) == 3 + len(ct_slices)
    assert events[0]["event"] == "stage_start" and events[0]["stage"] == "synthesis"
    assert events[-1]["event"] == "stage_end" and events[-1]["metrics"]["generated"] == 6

    # same result as an uninterrupted run from scratch
    fresh = run_synthesis(ct_slices, teacher, tmp_path / "fresh", cfg)
    assert len(fresh) == len(ts)
    assert torch.allclose(torch.as_tensor(fresh.images), torch.as_tensor(ts.images), atol=1e-4)

    # filtering is reported and consistent with the stored confidences
    m = ts.manifest
    assert m["filter"]["kept"] + m["filter"]["dropped"] == 6 and m["filter"]["kept"] == len(ts)
    assert all(c >= 0.5 for c in ts.confidence.tolist())
    assert all(d["confidence"] < 0.5 or d["condition_dice"] < 0.8 for d in m["dropped"])
    # a mask-conditioned slice is kept only when the teacher's label agrees with its mask
    assert all(e["confidence"] >= 0.5 and (e["condition_dice"] is None or e["condition_dice"] >= 0.8)
                          for e in m["items"])
    assert m["filter"].get("failed_condition_check", 0) == sum(
        1 for d in m["dropped"] if d["confidence"] >= 0.5 and d["condition_dice"] < 0.8)
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # round trip through disk, memory-mapped
    loaded = SyntheticTransferSet.load(out / "transfer")
    assert loaded.images.dtype == torch.float32 and loaded.probabilities.dtype == torch.float16
    assert loaded.images.shape == (len(ts), 1, S, S)
    assert loaded.probabilities.shape == (len(ts), len(CT_CLASSES) + 1, S, S)
    assert torch.equal(torch.as_tensor(loaded.images), torch.as_tensor(ts.images))
    assert torch.equal(torch.as_tensor(loaded.probabilities), torch.as_tensor(ts.probabilities))
    assert torch.equal(loaded.confidence, ts.confidence)
    on_disk = json.loads((out / "transfer" / "manifest.json").read_text())
    assert on_disk["format"] == "tskd-synthetic-transfer" and on_disk["count"] == len(ts)
    for n, item in enumerate(on_disk["items"]):
        assert item["index"] == n and item["source"] == "diffusion" and isinstance(item["seed"], int)
        assert item["confidence"] == pytest.approx(float(loaded.confidence[n]), abs=1e-4)
        assert item["condition"]["case"] == ct_slices.case_names[0]
    # pseudo-labels are the stored teacher probabilities of the stored images
    if len(loaded):
        again = teacher(torch.as_tensor(loaded.images[:2]))
        assert torch.allclose(again, loaded.probabilities[:2].float(), atol=2e-3)
        assert loaded.teacher_labels().shape == (len(loaded), S, S)
    # a finished stage is reused without any work
    calls.clear()
    again_ts = run_synthesis(ct_slices, counting_teacher, out, cfg)
    assert calls == [] and len(again_ts) == len(ts)


def test_synthetic_slices_never_ground_truth(ct_slices):
    g = torch.Generator().manual_seed(0)
    m = 4
    imgs = torch.rand(m, 1, S, S, generator=g)
    probs = torch.softmax(torch.randn(m, len(CT_CLASSES) + 1, S, S, generator=g), 1).half()
    ts = SyntheticTransferSet(imgs, probs, torch.rand(m), {"class_map": ct_slices.class_map.to_json_dict()})
    syn = ts.to_slice_set()
    assert syn.labels.eq(-1).all() and not syn.labelled.any() and syn.valid.all()
    both = ts.concat_to(ct_slices)
    n = len(ct_slices)
    assert len(both) == n + m and both.case_names[-1] == "synthetic"
    assert both.labels[n:].eq(-1).all() and not both.labelled[n:].any()
    assert torch.equal(both.labelled[:n], ct_slices.labelled)
    assert len(both.labelled_subset()) == int(ct_slices.labelled.sum())
    # the project's supervised loss ignores them: same loss with or without synthetic slices
    from TSKDLib.teacher import MaskedDiceCELoss
    loss = MaskedDiceCELoss()
    real = ct_slices.labelled_subset().subset([0, 1])
    logits = torch.randn(2 + m, len(CT_CLASSES), S, S, generator=g)
    lab = torch.cat([real.labels, both.labels[n:]])
    val = torch.cat([real.valid, both.valid[n:]])
    assert torch.allclose(loss(logits, lab, val)[0], loss(logits[:2], real.labels, real.valid)[0], atol=1e-6)


def test_transfer_set_load_errors(tmp_path):
    with pytest.raises(ModelPackageError):
        SyntheticTransferSet.load(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ModelPackageError):
        SyntheticTransferSet.load(tmp_path / "bad")


def test_teacher_labelling_checks_and_confidence(ct_slices, teacher):
    x = ct_slices.images[:3]
    probs, stats = label_images(x, teacher, len(CT_CLASSES), batch_size=2)
    assert probs.shape == (3, len(CT_CLASSES) + 1, S, S) and probs.dtype == torch.float16
    assert ((stats["confidence"] > 0) & (stats["confidence"] <= 1)).all()
    with pytest.raises(ConfigError):
        label_images(x, lambda b: teacher(b)[:, :2], len(CT_CLASSES))  # wrong class count
    with pytest.raises(ConfigError):
        label_images(x, lambda b: teacher(b) * 3, len(CT_CLASSES))  # not probabilities
    sure = torch.zeros(1, 3, 8, 8)
    sure[:, 1] = 1
    unsure = torch.full((1, 3, 8, 8), 1 / 3)
    cs, cu = teacher_confidence(sure), teacher_confidence(unsure)
    assert cs["confidence"].item() == pytest.approx(1.0) and cs["entropy"].item() == pytest.approx(0.0, abs=1e-5)
    assert cu["confidence"].item() == pytest.approx(1 / 3) and cu["entropy"].item() == pytest.approx(1.0, abs=1e-4)


def test_histogram_distance(ct_slices):
    same = intensity_histogram_distance(ct_slices.images, ct_slices.images)
    assert same["tv"] == pytest.approx(0.0, abs=1e-6) and same["w1"] == pytest.approx(0.0, abs=1e-6)
    far = intensity_histogram_distance(torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8))
    assert far["tv"] == pytest.approx(1.0) and far["w1"] == pytest.approx(1.0)


def test_config_presets_and_errors():
    for name in ("fast", "balanced", "quality"):
        cfg = SynthesisConfig.preset(name)
        assert cfg.preset_name == name
        assert SynthesisConfig.from_dict(cfg.to_dict()) == cfg
    assert SynthesisConfig.preset("fast", num_images=5).num_images == 5
    with pytest.raises(ConfigError):
        SynthesisConfig.preset("turbo")
    with pytest.raises(ConfigError):
        SynthesisConfig.from_dict({"resolution": 30, "block_out_channels": [16, 32, 64]})
    with pytest.raises(ConfigError):
        SynthesisConfig.from_dict({"sampler": "euler"})
    with pytest.raises(ConfigError):
        SynthesisConfig.from_dict({"colour": 1})
    a, b = tiny(), tiny(num_images=99, min_confidence=0.1)
    assert a.train_key("x") == b.train_key("x") != a.train_key("y")
    assert a.sample_key("t", 64) == b.sample_key("t", 64) != tiny(sampler="dpm").sample_key("t", 64)


def test_init_model_dir_must_fit(trained, tmp_path, ct_slices):
    cfg, res = trained
    res.model.save(tmp_path / "m")
    k = ct_slices.class_map.num_classes
    # fine-tuning from a saved model works (0 steps = the saved weights)
    cont = train_diffusion(ct_slices.images, ct_slices.labels, k, cfg.replace(init_model_dir=str(tmp_path / "m"),
                                                                            train_steps=0))
    for p, q in zip(cont.model.unet.parameters(), res.model.unet.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ConfigError):  # conditional model, unconditional task
        train_diffusion(ct_slices.images, ct_slices.labels, k,
                        cfg.replace(init_model_dir=str(tmp_path / "m"), conditioning="none"))
