"""``tskd benchmark``: the paper's comparison at several label budgets and seeds.

Methods (TS-KD, arXiv 2503.06976, Sec. 4 "compared methods"), all at the same distillation budget:

- ``scratch``: the student trained on the labelled slices only;
- ``task_agnostic``: feature distillation from the pre-trained, *not* fine-tuned teacher on the
  transfer set, then fine-tuning on the labels;
- ``tskd_nosyn``: task-specific distillation (fine-tuned teacher; outputs and features) on the
  labelled and unlabelled real slices, then fine-tuning;
- ``tskd``: the full method, with diffusion-synthesised slices labelled by the teacher;
- ``teacher``: the LoRA fine-tuned teacher itself (the upper reference).

Splits are by subject (2D folders; HC18's ``NNN_HC`` / ``NNN_2HC`` share subject ``NNN``) or by
volume (3D), never by slice: test subjects/volumes never contribute a labelled, unlabelled or
synthetic training slice. Writes ``results.csv`` (one row per method, budget, seed, test case and
class), ``results.md`` (mean and std over seeds of Dice and HD95), ``dice_vs_budget.png`` and
``timings.json``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from TSKDLib.errors import ConfigError
from TSKDLib.evaluation.metrics import dice_hd95, summarise_seeds
from TSKDLib.pipeline.progress import NullProgress, ProgressReporter
from TSKDLib.data.slices import labelled_mask

ALL_METHODS = ("scratch", "task_agnostic", "tskd_nosyn", "tskd", "teacher")


@dataclass
class BenchmarkData:
    """A pool of training cases and a disjoint set of test cases."""

    train: list            # Case objects (one subject/volume may have several)
    test: list
    kind: str              # "2d" or "3d"
    name: str = "dataset"


def split_2d(cases: list, n_test_subjects: int, seed: int = 1234) -> tuple[list, list]:
    """Split 2D cases by subject: ``n_test_subjects`` random subjects (fixed ``seed``) are test."""
    subjects = sorted({c.subject for c in cases})
    if n_test_subjects >= len(subjects):
        raise ConfigError(f"{n_test_subjects} test subjects requested but only {len(subjects)} exist.")
    rng = np.random.default_rng(seed)
    test_subjects = set(rng.choice(subjects, n_test_subjects, replace=False).tolist())
    return ([c for c in cases if c.subject not in test_subjects], [c for c in cases if c.subject in test_subjects])


def choose_labelled_2d(train: list, budget: int, seed: int) -> tuple[list, list]:
    """``budget`` labelled images from distinct subjects; the other training images are unlabelled."""
    rng = np.random.default_rng(seed)
    by_subject: dict[str, list] = {}
    for c in train:
        by_subject.setdefault(c.subject, []).append(c)
    subjects = sorted(by_subject)
    if budget > len(subjects):
        raise ConfigError(f"budget {budget} exceeds the {len(subjects)} training subjects.")
    chosen = rng.choice(subjects, budget, replace=False)
    labelled = [by_subject[s][int(rng.integers(len(by_subject[s])))] for s in chosen]
    ids = {id(c) for c in labelled}
    return labelled, [c for c in train if id(c) not in ids]


def _slices_2d(labelled: list, unlabelled: list, size: int):
    from TSKDLib.data.case import prepare_slices, with_labelled

    cases = [with_labelled(c, np.ones(1, bool)) for c in labelled] + \
            [with_labelled(c, np.zeros(1, bool)) for c in unlabelled]
    return prepare_slices(cases, size)


def _slices_3d(train: list, budget: int, seed: int, size: int):
    """Label ``budget`` slices per training volume: evenly spaced over the slices that hold a
    target class, with a seeded offset; the other slices are unlabelled."""
    from TSKDLib.data.case import prepare_slices, with_labelled

    rng = np.random.default_rng(seed)
    cases = []
    for c in train:
        lab = c.label_slices()
        holding = np.flatnonzero(labelled_mask(lab))  # slices holding a target class
        if len(holding) < budget:
            raise ConfigError(f"volume {c.name} has only {len(holding)} slices with the target classes.")
        step = len(holding) / budget
        offset = rng.uniform(0, step)
        pick = holding[np.minimum((offset + step * np.arange(budget)).astype(int), len(holding) - 1)]
        flags = np.zeros(c.num_slices, bool)
        flags[pick] = True
        cases.append(with_labelled(c, flags))
    return prepare_slices(cases, size)


def evaluate(predict_proba, data: BenchmarkData, size: int) -> list[dict]:
    """Per test case and class: Dice and HD95 (mm when the case has spacing)."""
    from TSKDLib.data.case import predict_case

    rows = []
    k = data.test[0].class_map.num_classes
    for case in data.test:
        pred = predict_case(predict_proba, case, size)
        ref = case.label_slices()
        if data.kind == "2d":
            pred, ref, spacing = pred[0], ref[0], case.slice_spacing()
        else:
            spacing = (case.canonical_image.GetSpacing()[2],) + case.slice_spacing()
        for cls, s in dice_hd95(pred, ref, k, spacing).items():
            rows.append({"case": case.name, "class": case.class_map.names[cls - 1], **s})
    return rows


@dataclass
class BenchmarkConfig:
    budgets: list[int] = field(default_factory=lambda: [5, 10, 20])
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    preset: str = "fast"
    size: int = 256
    max_unlabelled: int = 60
    teacher: dict = field(default_factory=dict)
    synthesis: dict = field(default_factory=dict)
    distillation: dict = field(default_factory=dict)
    device: str = "auto"


def run_benchmark(data: BenchmarkData, config: BenchmarkConfig, out: str | Path,
                  progress: ProgressReporter | None = None) -> dict:
    """Run every method at every budget and seed; write CSV, markdown, plot and timings to ``out``.

    Returns ``{"rows": [...], "summary": {...}, "timings": {...}}``."""
    import torch

    from TSKDLib.pipeline.config import PipelineConfig

    progress, out = start_run(config.methods, ALL_METHODS, progress, out)
    pc = PipelineConfig(preset=config.preset, teacher=config.teacher, synthesis=config.synthesis,
                        distillation=config.distillation, device=config.device)
    pc.data.images = ["-"]
    stage = pc.stage_configs()
    rows: list[dict] = []
    timer = _Timer()
    shared: dict = {}  # the task-agnostic teacher, loaded once
    runs = [(b, s) for b in config.budgets for s in config.seeds]
    progress.stage_start("benchmark", len(runs) * len(config.methods))
    for budget, seed in runs:
        torch.manual_seed(seed)
        for method, proba in _trained_methods(data, config, stage, budget, seed, timer, shared):
            for r in evaluate(proba, data, config.size):
                rows.append({"dataset": data.name, "method": method, "budget": budget, "seed": seed, **r})
            progress.update(message=f"{method} budget {budget} seed {seed}")
        _write_outputs(out, rows, timer.runs, config)
    progress.stage_end({})
    summary = summarise(rows)
    return {"rows": rows, "summary": summary, "timings": {k: float(np.mean(v)) for k, v in timer.runs.items()}}


def start_run(methods, known, progress: ProgressReporter | None, out: str | Path) -> tuple:
    """Common start of a benchmark run: check ``methods`` against ``known`` (:class:`ConfigError`
    naming the unknown ones), tune the allocator, create ``out``. Returns ``(progress, out)``
    with a :class:`NullProgress` for None and ``out`` as a ``Path``."""
    from TSKDLib.engine.runtime import tune_allocator

    unknown = set(methods) - set(known)
    if unknown:
        raise ConfigError(f"unknown method(s) {sorted(unknown)}; choose from {list(known)}.")
    tune_allocator()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return progress or NullProgress(), out


def student_proba(model):
    """A student as a ``(b, 1, S, S) -> (b, K+1, S, S)`` probability function (eval mode)."""
    import torch

    model.eval()
    return lambda x: torch.softmax(model(x), 1)


def with_synthetic_outputs(teacher, cache, images):
    """``cache`` (teacher outputs on the real transfer slices) followed by the teacher's outputs
    on the synthetic ``images`` ``(M, 1, S, S)``: the cache of the real + synthetic transfer set."""
    from TSKDLib.distillation.distill import TeacherCache, build_teacher_cache

    syn_cache = build_teacher_cache(teacher, images)
    return TeacherCache(np.concatenate([cache.probs, syn_cache.probs]),
                        np.concatenate([cache.embedding, syn_cache.embedding]))


class _Timer:
    """Wall-clock seconds of each run of each named step: ``runs = {name: [seconds, ...]}``."""

    def __init__(self):
        self.runs: dict[str, list[float]] = {}

    def __call__(self, name: str, fn):
        """``fn()``, timed under ``name``; returns its result."""
        t0 = time.monotonic()
        r = fn()
        self.runs.setdefault(name, []).append(time.monotonic() - t0)
        return r


def _trained_methods(data: BenchmarkData, config: BenchmarkConfig, stage: dict, budget: int, seed: int,
                     timed: _Timer, shared: dict):
    """Train each method of ``config.methods`` on one (budget, seed) draw, in a fixed order
    (teacher, scratch, task_agnostic, tskd_nosyn, tskd); yields ``(method, predict_proba)`` as
    each is ready (the caller scores it before the next one trains)."""
    from TSKDLib.distillation.distill import TransferSet, build_teacher_cache, distill, method_config

    if data.kind == "2d":
        lab, unl = choose_labelled_2d(data.train, budget, seed)
        slices = _slices_2d(lab, unl[: config.max_unlabelled], config.size)
    else:
        slices = _slices_3d(data.train, budget, seed, config.size)
    transfer = TransferSet.build(slices)
    tcfg = stage["teacher"]
    tcfg.seed = seed
    need_teacher = {"teacher", "tskd", "tskd_nosyn"} & set(config.methods)
    teacher = _finetuned_teacher(slices, tcfg, seed, timed) if need_teacher else None
    dcfg = stage["distillation"]
    dcfg.seed = seed
    if "teacher" in config.methods:
        yield "teacher", lambda x: teacher.predict_proba(x)
    if "scratch" in config.methods:
        res = timed("distill_scratch", lambda: distill(transfer, method_config("scratch", dcfg), student=stage["student"]))
        yield "scratch", student_proba(res.model)
    real_cache = None
    if {"tskd_nosyn", "tskd"} & set(config.methods):
        # teacher outputs on the real transfer slices, computed once and shared
        real_cache = timed("teacher_cache", lambda: build_teacher_cache(teacher, transfer.images))
    if "task_agnostic" in config.methods:
        cache = task_agnostic_cache(teacher, real_cache, transfer, tcfg, timed, shared)
        res = timed("distill_task_agnostic", lambda: distill(
            transfer, method_config("task_agnostic", dcfg), cache, student=stage["student"]))
        yield "task_agnostic", student_proba(res.model)
    if "tskd_nosyn" in config.methods:
        res = timed("distill_tskd_nosyn", lambda: distill(
            transfer, method_config("tskd", dcfg), real_cache, student=stage["student"]))
        yield "tskd_nosyn", student_proba(res.model)
    if "tskd" in config.methods:
        yield "tskd", student_proba(_tskd_with_synthesis(slices, transfer, teacher, real_cache, stage, seed, timed))


def _finetuned_teacher(slices, tcfg, seed: int, timed: _Timer):
    """The task-specific teacher fine-tuned on the labelled slices (eval mode)."""
    from TSKDLib.data.dataset import SliceDataset
    from TSKDLib.teacher import build_teacher, finetune_teacher

    t = build_teacher(slices.class_map.names, tcfg)
    teacher, _ = timed("teacher_finetune", lambda: finetune_teacher(
        t, SliceDataset(slices.labelled_subset(), augment=True, seed=seed), tcfg))
    teacher.eval()
    return teacher


def task_agnostic_cache(teacher, real_cache, transfer, tcfg, timed: _Timer, shared: dict):
    """Embeddings of the pre-trained foundation model on the transfer slices (no probabilities)."""
    from TSKDLib.distillation.distill import TeacherCache, build_teacher_cache
    from TSKDLib.teacher import TaskAgnosticTeacher, load_foundation_model

    if real_cache is not None and not teacher.adapts_encoder:
        # decoder-side LoRA leaves the encoder as pre-trained: same embeddings
        return TeacherCache(None, real_cache.embedding)
    if "agnostic" not in shared:
        shared["agnostic"] = TaskAgnosticTeacher(load_foundation_model(tcfg.backend, tcfg.checkpoint))
    agnostic = shared["agnostic"]
    return timed("teacher_cache", lambda: build_teacher_cache(lambda x: agnostic.embed(x), transfer.images,
                                                              with_probs=False))


def _tskd_with_synthesis(slices, transfer, teacher, real_cache, stage: dict, seed: int, timed: _Timer):
    """TS-KD's student: synthesis (in a temporary folder), then distillation on real + synthetic."""
    import tempfile

    from TSKDLib.distillation.distill import TransferSet, distill, method_config
    from TSKDLib.synthesis import run_synthesis

    scfg = stage["synthesis"]
    scfg.seed = seed
    with tempfile.TemporaryDirectory(prefix="tskd-bench-syn-") as tmp:
        syn = timed("synthesis", lambda: run_synthesis(slices, teacher.predict_proba, tmp, scfg))
        full = TransferSet.build(slices, syn.images)
        cache = real_cache
        if len(full) > len(transfer):
            cache = timed("teacher_cache", lambda: with_synthetic_outputs(teacher, real_cache, full.images[len(transfer):]))
        res = timed("distill_tskd", lambda: distill(full, method_config("tskd", stage["distillation"]), cache,
                                                    student=stage["student"]))
    return res.model


def summarise(rows: list[dict]) -> dict:
    """Mean and std over seeds of the per-seed mean Dice/HD95 (over test cases and classes):
    ``{(dataset, method, budget): {...}}`` (:func:`TSKDLib.evaluation.metrics.summarise_seeds`).

    Per seed, a class absent from both prediction and reference in a case does not count."""
    per: dict[tuple, dict[int, list]] = {}
    for r in rows:
        key = (r["dataset"], r["method"], r["budget"])
        per.setdefault(key, {}).setdefault(r["seed"], []).append(r)
    return summarise_seeds(per)


def _fmt(m, s, digits):
    if m is None or math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _write_outputs(out: Path, rows: list[dict], timings: dict, config: BenchmarkConfig) -> None:
    if not rows:
        return
    from TSKDLib.data.io import write_csv
    from TSKDLib.deploy.export import tool_versions

    write_csv(out / "results.csv", rows)
    summary = summarise(rows)
    budgets = sorted({k[2] for k in summary})
    lines = ["| dataset | method | " + " | ".join(f"Dice @{b}" for b in budgets) + " | " +
             " | ".join(f"HD95 @{b}" for b in budgets) + " |",
             "|---|---|" + "---|" * (2 * len(budgets))]
    for ds in sorted({k[0] for k in summary}):
        for method in ALL_METHODS:
            if not any(k[:2] == (ds, method) for k in summary):
                continue
            cells = [_fmt(summary[(ds, method, b)]["dice_mean"], summary[(ds, method, b)]["dice_std"], 3)
                     if (ds, method, b) in summary else "" for b in budgets]
            cells += [_fmt(summary[(ds, method, b)]["hd95_mean"], summary[(ds, method, b)]["hd95_std"], 1)
                      if (ds, method, b) in summary else "" for b in budgets]
            lines.append(f"| {ds} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "tools: " + json.dumps(tool_versions())]  # students differ between torch versions
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "timings.json").write_text(json.dumps({k: {"mean_s": float(np.mean(v)), "runs": len(v)}
                                                  for k, v in timings.items()}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in ALL_METHODS:
            pts = sorted((k[2], v["dice_mean"], v["dice_std"]) for k, v in summary.items() if k[1] == method)
            if pts:
                b, m, s = zip(*pts)
                ax.errorbar(b, m, yerr=s, marker="o", capsize=3, label=method)
        ax.set_xlabel("labelled slices")
        ax.set_ylabel("Dice")
        ax.set_title(", ".join(sorted({k[0] for k in summary})))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "dice_vs_budget.png", dpi=90)
        plt.close(fig)
    except Exception as exc:  # plotting must not lose the figures already written
        warnings.warn(f"plot not written: {exc}")
