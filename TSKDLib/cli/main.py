"""The ``tskd`` command.

Subcommands are thin wrappers over the Python API; every error TSKD raises on purpose
(:class:`TSKDLib.errors.TSKDError`) is printed as one line (and, with ``--progress-json``, as a
final ``{"event": "error"}`` line) and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from TSKDLib.cli.args import add_axis_argument, parse_slices_arg
from TSKDLib.errors import TSKDError
from TSKDLib.version import __version__

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    """Load a scan (and labels) through the data layer and print what TSKD sees."""
    import warnings

    import numpy as np

    from TSKDLib.data.case import load_case
    from TSKDLib.data import geometry
    from TSKDLib.data.geometry import describe_geometry, orientation_code

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case = load_case(args.image, args.labels, args.class_map, classes=args.classes,
                         labelled_slices=parse_slices_arg(args.labelled_slices), axis=args.axis)
    report = {
        "image": str(args.image), "modality": case.modality,
        "geometry": describe_geometry(case.image), "orientation": orientation_code(case.image),
        "axis": case.axis, "slices": case.num_slices, "slice_spacing_mm": case.slice_spacing(),
        "file_slice_axis": "ijk"[case.frame.file_slice_axis],
        "acquisition_plane": geometry.acquisition_plane(case.image),
        "warnings": [str(w.message) for w in caught],
    }
    if case.labels is not None:
        lab = case.label_slices()
        labelled = case.labelled_indices()
        report["labelled_file_slices"] = case.labelled_file_indices()
        per_class = {}
        for i, name in enumerate(case.class_map.names, start=1):
            present = [int(k) for k in labelled if np.any(lab[k] == i)]
            per_class[name] = {"labelled_slices_with_class": len(present),
                               "voxels_in_labelled_slices": int(sum((lab[k] == i).sum() for k in labelled))}
        report.update(labelled_slices=labelled, classes=per_class)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for k, v in report.items():
            if k == "classes":
                for name, d in v.items():
                    print(f"  {name:>16}: {d['labelled_slices_with_class']} labelled slice(s), "
                          f"{d['voxels_in_labelled_slices']} voxels")
            elif k != "warnings" or v:
                print(f"{k}: {v}")
    return 0


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tskd",
        description="Task-specific knowledge distillation (arXiv 2503.06976) for medical image "
                    "segmentation: fine-tune a foundation model on a few labelled slices, "
                    "distil a fast student, segment whole scans on a CPU.")
    p.add_argument("--version", action="version", version=f"tskd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("inspect", help="show how TSKD reads a scan and its labels (geometry, "
                                       "labelled slices per class)")
    q.add_argument("image", help="volume file, DICOM folder or 2D image")
    q.add_argument("--labels", help="label volume, .seg.nrrd or 2D mask")
    q.add_argument("--class-map", help="JSON {value: name} for label volumes")
    q.add_argument("--classes", nargs="+", help="class names to learn (default: all)")
    q.add_argument("--labelled-slices", help="labelled slice indices (the file's own, along the slice axis), "
                                            "e.g. 2,7,12-14")
    add_axis_argument(q)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_inspect)

    from TSKDLib.cli.pipeline_cli import add_pipeline_commands
    add_pipeline_commands(sub)  # train, segment, info, export, demo, benchmark

    u = sub.add_parser("update", help="quick update: fine-tune a trained student on its transfer set plus "
                                      "corrected slices (the teacher's cached outputs are reused)")
    u.add_argument("model", help="model package (run's model/, library copy, earlier update) or run folder")
    u.add_argument("--image", required=True, help="the corrected scan (volume file or DICOM folder)")
    u.add_argument("--labels", required=True, help="its labels (label volume or .seg.nrrd)")
    u.add_argument("--class-map", help="JSON {value: name} of the label values (default: the model's)")
    u.add_argument("--slices", required=True, help="corrected/labelled slice indices along the model's "
                                                   "slice axis (the file's own), e.g. 12,17-18")
    u.add_argument("--run", help="the model's training run folder (when the package does not record it)")
    add_axis_argument(u, default=None, help="slice axis; must be the model's (default: the model's)")
    u.add_argument("--out", required=True, help="folder of the new model package")
    u.add_argument("--steps", type=int, default=None, help="distillation steps (default 150)")
    u.add_argument("--finetune-steps", type=int, default=None, help="supervised steps on labels (default 40)")
    u.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    u.add_argument("--threads", type=int, default=None, help="CPU threads")
    u.add_argument("--report", help="also write the result (Dice before/after) to this JSON file")
    u.add_argument("--overwrite", action="store_true", help="replace an existing --out package")
    u.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stdout")
    u.set_defaults(func=cmd_update)
    return p


def cmd_update(args) -> int:
    """``tskd update``: :func:`TSKDLib.distillation.update.quick_update`; prints Dice before/after."""
    from TSKDLib.cli.pipeline_cli import _reporter
    from TSKDLib.distillation.update import DEFAULT_FINETUNE_STEPS, DEFAULT_STEPS, quick_update

    slices = parse_slices_arg(args.slices, "--slices") or []
    progress = _reporter(args)
    result = quick_update(args.model, args.image, args.labels, slices, args.out, class_map=args.class_map,
                          run=args.run, axis=args.axis,
                          steps=DEFAULT_STEPS if args.steps is None else args.steps,
                          finetune_steps=DEFAULT_FINETUNE_STEPS if args.finetune_steps is None else args.finetune_steps,
                          device=args.device, threads=args.threads, progress=progress, overwrite=args.overwrite)
    if args.report:
        from TSKDLib.data.io import atomic_write
        text = json.dumps(result, indent=1)
        atomic_write(Path(args.report), lambda tmp: tmp.write_text(text), overwrite=True)
    if args.progress_json:
        progress.done({"dice_before": result["dice_before"], "dice_after": result["dice_after"],
                       "review": result["review"]}, result["model_dir"])
    else:
        fmt = (lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items() if not math.isnan(v)))
        print(f"new model: {result['model_dir']} ({result['seconds']:.0f} s)")
        if not all(math.isnan(v) for v in result["dice_before"].values()):
            print(f"Dice on slices {result['slices']}: before {fmt(result['dice_before'])}; "
                  f"after {fmt(result['dice_after'])}")
        erased = [(k, v, result["painted_after"][k]) for k, v in result["painted_before"].items() if v]
        if erased:
            print(f"pixels painted on slices {result['slices']} where you drew none of the class, before -> after: "
                  + ", ".join(f"{k} {b} -> {a}" for k, b, a in erased))
        print(review_text(result))
        done = ",".join(map(str, result["slices"]))
        print(f"if the scan is still wrong somewhere: `tskd segment {result['model_dir']} SCAN` names new slices to "
              f"check (never these); correct them in the same labels file and run `tskd update {result['model_dir']} "
              f"... --slices {done},NEW` (a second round fixed what the first missed on CHAOS MR; "
              "benchmarks/RESULTS.md, section 6)")
    return 0


def review_text(result: dict) -> str:
    """What ``tskd update`` says about the slices nobody corrected (:func:`TSKDLib.distillation.update.changes_elsewhere`)."""
    changes, review = result.get("changes") or {}, result.get("review") or {}
    if not changes:
        return "every slice of the scan was corrected: nothing else to review."
    agree = ", ".join(f"{k} {v['agreement']:.2f}" for k, v in changes.items())
    text = f"elsewhere on this scan the updated model agrees with the previous one: {agree} (Dice)."
    if review:
        where = "; ".join(f"{k} on slices {', '.join(map(str, s))}" for k, s in review.items())
        text += f"\nreview where it changed most (not checked against any label): {where}."
    return text


def _report_error(args, exc: TSKDError) -> int:
    if getattr(args, "progress_json", False):
        sys.stdout.write(json.dumps({"v": 1, "event": "error", "stage": None, "message": str(exc),
                                     "error_type": type(exc).__name__}) + "\n")
        sys.stdout.flush()
    print(f"tskd: error: {exc}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except TSKDError as exc:
        return _report_error(args, exc)
    except OSError as exc:
        # Last resort for a write outside TSKDLib.data.io's guarded writers: a full disk, a permission
        # or a read-only file system is still one line and exit status 2, never a traceback.
        from TSKDLib.data.io import WRITE_ERRNOS, write_error
        err = write_error(exc, exc.filename or "output") if exc.errno in WRITE_ERRNOS else None
        if err is None:
            raise
        return _report_error(args, err)
    except KeyboardInterrupt:
        if getattr(args, "progress_json", False):
            sys.stdout.write(json.dumps({"v": 1, "event": "log", "stage": None, "level": "warning",
                                         "message": "stopped; run the same command again to resume."}) + "\n")
            sys.stdout.flush()
        print("tskd: stopped; run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
