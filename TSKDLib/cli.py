"""The ``tskd`` command.

Subcommands are thin wrappers over the Python API; every error TSKD raises on purpose
(:class:`TSKDLib.errors.TSKDError`) is printed as one line (and, with ``--progress-json``, as a
final ``{"event": "error"}`` line) and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_args import add_axis_argument, parse_slices_arg
from .errors import TSKDError
from .version import __version__

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    """Load a scan (and labels) through the data layer and print what TSKD sees."""
    import warnings

    import numpy as np

    from .case import load_case
    from . import geometry
    from .geometry import describe_geometry, orientation_code

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

    from .pipeline_cli import add_pipeline_commands
    add_pipeline_commands(sub)  # train, segment, info, export, demo, benchmark
    return p


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
        # Last resort for a write outside TSKDLib.io's guarded writers: a full disk, a permission
        # or a read-only file system is still one line and exit status 2, never a traceback.
        from .io import WRITE_ERRNOS, write_error
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
