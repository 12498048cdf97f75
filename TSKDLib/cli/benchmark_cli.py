"""``tskd benchmark`` arguments and dispatch: the random-budget comparison (:mod:`TSKDLib.evaluation.benchmark`)
or the sparse-slice protocol (:mod:`TSKDLib.evaluation.sparse_benchmark`), both reading 2D folders or
IMAGE::LABELS volumes through the data layer.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from TSKDLib.evaluation.benchmark import ALL_METHODS, BenchmarkConfig, BenchmarkData, run_benchmark, split_2d
from TSKDLib.errors import ConfigError, InputError
from TSKDLib.pipeline.progress import ProgressReporter


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
                        "the scan and on the other --volumes (TSKDLib.evaluation.sparse_benchmark)")
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
    from TSKDLib.cli.args import add_axis_argument
    add_axis_argument(p)  # 3D volumes: slice axis (default acquisition)


def _pair(spec: str) -> tuple[str, str]:
    if "::" not in spec:
        raise ConfigError(f"volume {spec!r} must be IMAGE::LABELS.")
    a, b = spec.split("::", 1)
    return a, b


def load_benchmark_data(args) -> BenchmarkData:
    from TSKDLib.data.case import load_2d_cases

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
    from TSKDLib.data.case import load_case
    from TSKDLib.data.geometry import LabelGeometryWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelGeometryWarning)
        axis = getattr(args, "axis", None) or "acquisition"
        train = [load_case(*_pair(v), args.class_map, classes=args.classes, axis=axis) for v in train_specs]
        test = [load_case(*_pair(v), args.class_map, classes=args.classes, axis=axis) for v in test_specs]
    return train, test


def _run_sparse_cli(args, extra: dict) -> int:
    from TSKDLib.evaluation.sparse_benchmark import SparseConfig, run_sparse_benchmark

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
