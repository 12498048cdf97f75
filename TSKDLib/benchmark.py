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

import csv
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, InputError
from .metrics import dice_hd95, nanmean, nanstd
from .progress import NullProgress, ProgressReporter

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
    from .case import prepare_slices, with_labelled

    cases = [with_labelled(c, np.ones(1, bool)) for c in labelled] + \
            [with_labelled(c, np.zeros(1, bool)) for c in unlabelled]
    return prepare_slices(cases, size)


def _slices_3d(train: list, budget: int, seed: int, size: int):
    """Label ``budget`` slices per training volume: evenly spaced over the slices that hold a
    target class, with a seeded offset; the other slices are unlabelled."""
    from .case import prepare_slices, with_labelled

    rng = np.random.default_rng(seed)
    cases = []
    for c in train:
        lab = c.label_slices()
        holding = np.flatnonzero(lab.reshape(lab.shape[0], -1).max(1) > 0)
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
    from .case import predict_case

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

    from .config import PipelineConfig
    from .runtime import tune_allocator
    from .distill import TeacherCache, TransferSet, build_teacher_cache, distill, method_config
    from .teacher import TaskAgnosticTeacher, build_teacher, finetune_teacher, load_foundation_model

    unknown = set(config.methods) - set(ALL_METHODS)
    if unknown:
        raise ConfigError(f"unknown method(s) {sorted(unknown)}; choose from {list(ALL_METHODS)}.")
    progress = progress or NullProgress()
    tune_allocator()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pc = PipelineConfig(preset=config.preset, teacher=config.teacher, synthesis=config.synthesis,
                        distillation=config.distillation, device=config.device)
    pc.data.images = ["-"]
    stage = pc.stage_configs()
    rows: list[dict] = []
    timings: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.monotonic()
        r = fn()
        timings.setdefault(name, []).append(time.monotonic() - t0)
        return r

    agnostic = None
    runs = [(b, s) for b in config.budgets for s in config.seeds]
    progress.stage_start("benchmark", len(runs) * len(config.methods))
    for budget, seed in runs:
        torch.manual_seed(seed)
        if data.kind == "2d":
            lab, unl = choose_labelled_2d(data.train, budget, seed)
            unl = unl[: config.max_unlabelled]
            slices = _slices_2d(lab, unl, config.size)
        else:
            slices = _slices_3d(data.train, budget, seed, config.size)
        transfer = TransferSet.build(slices)
        tcfg = stage["teacher"]
        tcfg.seed = seed
        need_teacher = {"teacher", "tskd", "tskd_nosyn"} & set(config.methods)
        teacher = None
        if need_teacher:
            from .dataset import SliceDataset
            t = build_teacher(slices.class_map.names, tcfg)
            teacher, _ = timed("teacher_finetune", lambda: finetune_teacher(
                t, SliceDataset(slices.labelled_subset(), augment=True, seed=seed), tcfg))
            teacher.eval()
        dcfg = stage["distillation"]
        dcfg.seed = seed

        def record(method, proba):
            for r in evaluate(proba, data, config.size):
                rows.append({"dataset": data.name, "method": method, "budget": budget, "seed": seed, **r})
            progress.update(message=f"{method} budget {budget} seed {seed}")

        def student_proba(model):
            model.eval()
            return lambda x: torch.softmax(model(x), 1)

        if "teacher" in config.methods:
            record("teacher", lambda x: teacher.predict_proba(x))
        if "scratch" in config.methods:
            res = timed("distill_scratch", lambda: distill(transfer, method_config("scratch", dcfg),
                                                            student=stage["student"]))
            record("scratch", student_proba(res.model))
        real_cache = None
        if {"tskd_nosyn", "tskd"} & set(config.methods):
            # teacher outputs on the real transfer slices, computed once and shared
            real_cache = timed("teacher_cache", lambda: build_teacher_cache(teacher, transfer.images))
        if "task_agnostic" in config.methods:
            if real_cache is not None and not teacher.adapts_encoder:
                # decoder-side LoRA leaves the encoder as pre-trained: same embeddings
                cache = TeacherCache(None, real_cache.embedding)
            else:
                if agnostic is None:
                    agnostic = TaskAgnosticTeacher(load_foundation_model(tcfg.backend, tcfg.checkpoint))
                cache = timed("teacher_cache", lambda: build_teacher_cache(
                    lambda x: agnostic.embed(x), transfer.images, with_probs=False))
            res = timed("distill_task_agnostic", lambda: distill(
                transfer, method_config("task_agnostic", dcfg), cache, student=stage["student"]))
            record("task_agnostic", student_proba(res.model))
        if "tskd_nosyn" in config.methods:
            res = timed("distill_tskd_nosyn", lambda: distill(
                transfer, method_config("tskd", dcfg), real_cache, student=stage["student"]))
            record("tskd_nosyn", student_proba(res.model))
        if "tskd" in config.methods:
            import tempfile

            from .synthesis import run_synthesis
            scfg = stage["synthesis"]
            scfg.seed = seed
            with tempfile.TemporaryDirectory(prefix="tskd-bench-syn-") as tmp:
                syn = timed("synthesis", lambda: run_synthesis(slices, teacher.predict_proba, tmp, scfg))
                full = TransferSet.build(slices, syn.images)
                cache = real_cache
                if len(full) > len(transfer):
                    syn_cache = timed("teacher_cache", lambda: build_teacher_cache(teacher, full.images[len(transfer):]))
                    cache = TeacherCache(np.concatenate([real_cache.probs, syn_cache.probs]),
                                         np.concatenate([real_cache.embedding, syn_cache.embedding]))
                res = timed("distill_tskd", lambda: distill(full, method_config("tskd", dcfg), cache,
                                                            student=stage["student"]))
            record("tskd", student_proba(res.model))
        _write_outputs(out, rows, timings, config)
    progress.stage_end({})
    summary = summarise(rows)
    return {"rows": rows, "summary": summary, "timings": {k: float(np.mean(v)) for k, v in timings.items()}}


def summarise(rows: list[dict]) -> dict:
    """Mean and std over seeds of the per-seed mean Dice/HD95 (over test cases and classes).

    Per seed, a class absent from both prediction and reference in a case does not count."""
    per: dict[tuple, dict[int, list]] = {}
    for r in rows:
        key = (r["dataset"], r["method"], r["budget"])
        per.setdefault(key, {}).setdefault(r["seed"], []).append(r)
    out = {}
    for key, by_seed in per.items():
        dice = [nanmean([r["dice"] for r in rs]) for rs in by_seed.values()]
        hd = [nanmean([r["hd95"] for r in rs]) for rs in by_seed.values()]
        out[key] = {"dice_mean": nanmean(dice), "dice_std": nanstd(dice), "hd95_mean": nanmean(hd),
                    "hd95_std": nanstd(hd), "seeds": len(by_seed)}
    return out


def _fmt(m, s, digits):
    if m is None or math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _write_outputs(out: Path, rows: list[dict], timings: dict, config: BenchmarkConfig) -> None:
    if not rows:
        return
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
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


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def add_benchmark_arguments(p) -> None:
    p.add_argument("--images", help="2D dataset: folder of images (HC18: images/)")
    p.add_argument("--masks", help="2D dataset: folder of masks (HC18: masks/)")
    p.add_argument("--mask-suffix", default="_Annotation", help="mask file name = image stem + suffix")
    p.add_argument("--mask-threshold", type=int, default=128, help="binarise 0/255 masks (none: -1)")
    p.add_argument("--test-subjects", type=int, default=20, help="2D: number of held-out test subjects")
    p.add_argument("--volumes", nargs="+", help="3D training volumes as IMAGE::LABELS")
    p.add_argument("--test-volumes", nargs="+", help="3D held-out volumes as IMAGE::LABELS")
    p.add_argument("--class-map", required=True, help="JSON {value: name}")
    p.add_argument("--classes", nargs="+", help="classes to learn (default: all)")
    p.add_argument("--budgets", nargs="+", type=int, default=[5, 10, 20],
                   help="labelled images (2D) or labelled slices per volume (3D)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=None, choices=sorted(set(ALL_METHODS) | {"fill_between"}),
                   help="default: every method of the protocol (sparse-slices: fill_between teacher scratch "
                        "tskd_nosyn)")
    p.add_argument("--preset", default="fast", choices=["fast", "balanced", "quality"])
    p.add_argument("--max-unlabelled", type=int, default=60, help="2D: unlabelled training images used")
    p.add_argument("--name", default=None, help="dataset name in the tables")
    p.add_argument("--config", help="JSON with 'teacher', 'synthesis', 'distillation', 'student' overrides")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--protocol", default="random", choices=["random", "sparse-slices"],
                   help="random: --budgets slices per volume / images (the paper's comparison); "
                        "sparse-slices: per class the slices at 25/50/75%% of its extent, scored within "
                        "the scan and on the other --volumes (TSKDLib.sparse_benchmark)")
    p.add_argument("--slices-per-class", type=int, default=3, help="sparse-slices: labelled slices per class")
    p.add_argument("--train-groups", nargs="+", default=None,
                   help="sparse-slices: training groups as comma-separated indices into --volumes "
                        "(e.g. 0,1,2); default: each volume alone")
    p.add_argument("--skip-teacher-other", action="store_true",
                   help="sparse-slices: do not run the teacher on the other scans (slow on a CPU)")
    p.add_argument("--within-only", action="store_true",
                   help="sparse-slices: score within the training scans only (skip the other scans)")
    p.add_argument("--work-dir", default=None,
                   help="keep each experiment's teacher and teacher outputs here and reuse them on rerun")
    from .cli_args import add_axis_argument
    add_axis_argument(p)  # 3D volumes: slice axis (default acquisition)


def _pair(spec: str) -> tuple[str, str]:
    if "::" not in spec:
        raise ConfigError(f"volume {spec!r} must be IMAGE::LABELS.")
    a, b = spec.split("::", 1)
    return a, b


def load_benchmark_data(args) -> BenchmarkData:
    from .case import load_2d_cases, load_case
    from .geometry import LabelGeometryWarning

    if args.images:
        cases = load_2d_cases(args.images, args.masks, args.class_map, mask_suffix=args.mask_suffix,
                              mask_threshold=None if args.mask_threshold < 0 else args.mask_threshold)
        cases = [c for c in cases if c.labels is not None]
        train, test = split_2d(cases, args.test_subjects)
        return BenchmarkData(train, test, "2d", args.name or Path(args.images).resolve().parent.name)
    if not args.volumes or not args.test_volumes:
        raise InputError("give --images/--masks (2D) or --volumes and --test-volumes (3D).")
    return BenchmarkData(*_load_volumes(args, args.volumes, args.test_volumes), "3d", args.name or "volumes")


def _load_volumes(args, train_specs, test_specs) -> tuple[list, list]:
    from .case import load_case
    from .geometry import LabelGeometryWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelGeometryWarning)
        axis = getattr(args, "axis", None) or "acquisition"
        train = [load_case(*_pair(v), args.class_map, classes=args.classes, axis=axis) for v in train_specs]
        test = [load_case(*_pair(v), args.class_map, classes=args.classes, axis=axis) for v in test_specs]
    return train, test


def _run_sparse_cli(args, extra: dict) -> int:
    from .sparse_benchmark import SPARSE_METHODS, SparseConfig, run_sparse_benchmark

    if not args.volumes:
        raise InputError("the sparse-slice protocol needs --volumes IMAGE::LABELS (complete reference labels).")
    scans, _ = _load_volumes(args, args.volumes, [])
    methods = args.methods
    groups = [[int(i) for i in g.split(",")] for g in args.train_groups] if args.train_groups else None
    for g in groups or []:
        if any(i < 0 or i >= len(scans) for i in g):
            raise ConfigError(f"--train-groups index out of range (0..{len(scans) - 1}).")
    cfg = SparseConfig(seeds=args.seeds, per_class=args.slices_per_class, train_groups=groups, preset=args.preset,
                       teacher=extra.get("teacher", {}), synthesis=extra.get("synthesis", {}),
                       distillation=extra.get("distillation", {}), student=extra.get("student", {}),
                       device=args.device, work_dir=args.work_dir, other_scans=not args.within_only,
                       teacher_other=not args.skip_teacher_other)
    if methods:
        cfg.methods = methods
    progress = ProgressReporter(json_lines=args.progress_json, quiet=args.quiet)
    t0 = time.monotonic()
    run_sparse_benchmark(scans, cfg, args.out, progress, name=args.name or "scans")
    print((Path(args.out) / "results.md").read_text())
    print(f"total {time.monotonic() - t0:.0f} s; outputs in {args.out}")
    return 0


def run_benchmark_cli(args) -> int:
    extra = json.loads(Path(args.config).read_text()) if args.config else {}
    if args.protocol == "sparse-slices":
        return _run_sparse_cli(args, extra)
    data = load_benchmark_data(args)
    if args.methods and "fill_between" in args.methods:
        raise ConfigError("fill_between is a method of --protocol sparse-slices only.")
    cfg = BenchmarkConfig(budgets=args.budgets, seeds=args.seeds, methods=args.methods or list(ALL_METHODS),
                          preset=args.preset,
                          max_unlabelled=args.max_unlabelled, device=args.device,
                          teacher=extra.get("teacher", {}), synthesis=extra.get("synthesis", {}),
                          distillation=extra.get("distillation", {}))
    progress = ProgressReporter(json_lines=args.progress_json, quiet=args.quiet)
    progress.log(f"{data.name}: {len(data.train)} training and {len(data.test)} test cases "
                 f"({len({c.subject for c in data.train})} / {len({c.subject for c in data.test})} subjects)")
    t0 = time.monotonic()
    result = run_benchmark(data, cfg, args.out, progress)
    print((Path(args.out) / "results.md").read_text())
    print("mean seconds per run:", json.dumps({k: round(v, 1) for k, v in result["timings"].items()}))
    print(f"total {time.monotonic() - t0:.0f} s; outputs in {args.out}")
    return 0
