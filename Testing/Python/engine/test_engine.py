"""The training engine (TSKDLib.engine.loop), the preset table and the configuration vocabulary, and
the pipeline's prepare stage on several scans. Fast: no model is trained here (the three training
loops that run on the engine are tested in test_teacher.py, test_student.py,
test_distillation_quality.py, test_synthesis.py and test_distributed.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA
from TSKDLib.pipeline.config import DataConfig, PipelineConfig, tiny_config
from TSKDLib.engine.loop import Plateau, ResumeFile, Trainer, warmup_constant, warmup_cosine
from TSKDLib.errors import CheckpointError, ConfigError, LabelError
from TSKDLib.pipeline.presets import PRESETS, upgrade_names

HC18 = DATA / "hc18"


def test_schedules():
    assert [warmup_cosine(s, 2, 6) for s in range(2)] == [0.5, 1.0]
    assert warmup_cosine(2, 2, 6) == 1.0 and warmup_cosine(4, 2, 6) == pytest.approx(0.5)
    assert warmup_cosine(6, 2, 6) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(0, 0, 4) == 1.0
    assert [warmup_constant(s, 4) for s in (0, 3, 10)] == [0.25, 1.0, 1.0]


def test_plateau_counts_only_gains_of_min_delta():
    p = Plateau(min_delta=0.01)
    seen = [p.observe(v, i) for i, v in enumerate([0.5, 0.6, 0.605, 0.607, 0.9])]
    assert seen == [True, True, True, True, True] and p.best_step == 4 and p.bad == 0
    p = Plateau(min_delta=0.01)
    for i, v in enumerate([0.5, 0.6, 0.605, 0.607]):
        p.observe(v, i)
    assert p.stalled(2) and p.best == 0.607
    strict = Plateau(min_delta=0.0, strict=True)
    strict.observe(0.5, 0)
    assert not strict.observe(0.5, 1) and strict.bad == 1  # strict: an equal score is no progress
    loose = Plateau(min_delta=0.0)
    loose.observe(0.5, 0)
    assert not loose.observe(0.5, 1) and loose.bad == 0


def test_resume_file_names_the_changed_setting(tmp_path):
    ident = {"settings": {"lr": 0.001, "steps": 10}, "data": {"slices": 4}}
    ResumeFile(tmp_path / "c.pt", "teacher", ident).save({"step": 3})
    assert ResumeFile(tmp_path / "c.pt", "teacher", ident).load()["step"] == 3
    assert ResumeFile(tmp_path / "none.pt", "teacher", ident).load() is None
    other = {"settings": {"lr": 0.002, "steps": 10}, "data": {"slices": 4}}
    with pytest.raises(CheckpointError, match=r"settings.lr: 0.001 -> 0.002"):
        ResumeFile(tmp_path / "c.pt", "teacher", other).load()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        ResumeFile(tmp_path / "bad.pt", "distillation", ident).load()


def test_trainer_steps_sets_lr_and_stops_when_a_hook_says_so():
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    lrs = []
    trainer = Trainer(net, opt, torch.device("cpu"), lambda s: 0.1 * warmup_cosine(s, 1, 10), end=10,
                      clip_grad_norm=1.0)

    def step(s):
        lrs.append(opt.param_groups[0]["lr"])
        return net(torch.ones(1, 2)).sum()

    def stop_at_4(s):
        if s == 4:
            trainer.end = s
    assert trainer.fit(0, step, [stop_at_4]) == 4
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.1) and lrs[3] < lrs[1]


def test_preset_table_feeds_every_stage_and_old_names_are_read():
    assert set(PRESETS) == {"fast", "balanced", "quality"}
    for name in PRESETS:
        stages = PipelineConfig(preset=name, data=DataConfig(images=["x"])).stage_configs()
        for stage in ("teacher", "synthesis", "distillation"):
            for key, value in PRESETS[name][stage].items():
                assert getattr(stages[stage], key) == value, (name, stage, key)
    assert PipelineConfig(preset="quality", data=DataConfig(images=["x"])).stage_configs()["teacher"].steps == 600
    old = {"teacher": {"warmup": 3}, "synthesis": {"train_steps": 5, "learning_rate": 0.01, "num_threads": 1},
           "distillation": {"num_threads": 1}}
    cfg = PipelineConfig(data=DataConfig(images=["x"]), **old).stage_configs()
    assert cfg["teacher"].warmup_steps == 3 and cfg["synthesis"].steps == 5 and cfg["synthesis"].lr == 0.01
    assert cfg["distillation"].threads == 1
    with pytest.raises(ConfigError, match="twice"):
        upgrade_names({"warmup": 1, "warmup_steps": 2}, "teacher")
    cfg = PipelineConfig(data=DataConfig(images=["x"]), threads=3, device="cpu").stage_configs(device="cpu")
    assert {c.threads for k, c in cfg.items() if k != "student"} == {3}


def test_explicit_preset_wins_and_the_callers_config_is_not_changed(tmp_path):
    from TSKDLib.pipeline.run import _effective_config

    image = HC18 / "images" / "000_HC.png"
    given = dict(images=[image], labels=None, class_map=None, classes=None, labelled_slices=None,
                 device="cpu", threads=None, synthesis=None, axis=None)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**tiny_config(), "preset": "balanced"}))
    assert _effective_config(path, None, **given).preset == "balanced"
    assert _effective_config(path, "fast", **given).preset == "fast"  # fast is not "not given"
    mine = PipelineConfig(preset="quality")
    cfg = _effective_config(mine, "fast", **given)
    assert cfg.preset == "fast" and cfg.data.images == [str(image.resolve())]
    assert mine.preset == "quality" and mine.data.images == [] and mine.synthesis_enabled is None


def test_synthesis_runs_only_when_asked_on_every_device(tmp_path):
    """Stage 2 is off unless asked, also on a GPU (no synthetic slice passed the teacher check at
    the fast or balanced budgets: benchmarks/RESULTS.md section 8); --synthesis or the config turn it on."""
    from TSKDLib.pipeline.run import _effective_config

    given = dict(images=[HC18 / "images" / "000_HC.png"], labels=None, class_map=None, classes=None,
                 labelled_slices=None, threads=None, axis=None)
    for device in ("cpu", "cuda", "auto"):
        assert _effective_config(PipelineConfig(), None, device=device, synthesis=None, **given).synthesis_enabled is False
    assert _effective_config(PipelineConfig(), None, device="cuda", synthesis=True, **given).synthesis_enabled is True
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"synthesis_enabled": True}))
    assert _effective_config(path, None, device="cpu", synthesis=None, **given).synthesis_enabled is True


def _two_scans(tmp_path, second_mask: np.ndarray | None):
    masks = [HC18 / "masks" / "000_HC_Annotation.png"]
    if second_mask is not None:
        masks.append(tmp_path / "001_empty.png")
        Image.fromarray(second_mask).save(masks[-1])
    else:
        masks.append(HC18 / "masks" / "001_HC_Annotation.png")
    return DataConfig(images=[str(HC18 / "images" / "000_HC.png"), str(HC18 / "images" / "001_HC.png")],
                      labels=[str(m) for m in masks], class_map=str(HC18 / "labels.json"), size=64)


def test_prepare_accepts_one_unlabelled_scan_among_labelled_ones(tmp_path):
    """'No labelled slice in any scan' is checked over all scans: a scan without labels next to a
    labelled one is prepared (it contributes unlabelled slices), and the normalisation stored
    in cases.json is the one every scan was prepared with."""
    from TSKDLib.pipeline.run import _prepare, load_cases
    from TSKDLib.pipeline.progress import NullProgress

    shape = np.asarray(Image.open(HC18 / "masks" / "001_HC_Annotation.png")).shape
    data = _two_scans(tmp_path, np.zeros(shape, np.uint8))
    cases = load_cases(data)
    assert [bool(c.labelled.any()) for c in cases] == [True, False]
    slices = _prepare(PipelineConfig(data=data), tmp_path, NullProgress())
    assert len(slices) == 2 and slices.labelled.tolist() == [True, False]
    info = json.loads((tmp_path / "cases.json").read_text())
    assert [c["labelled_slices"] for c in info["cases"]] == [[0], []]
    assert info["normalization"]["kind"] == "percentile"
    empty = _two_scans(tmp_path, np.zeros(shape, np.uint8))
    empty.labels[0] = empty.labels[1]
    with pytest.raises(LabelError, match="any of the 2 scan"):
        load_cases(empty)
    assert math.isfinite(float(slices.images.mean()))
