"""``tskd train | segment | info | export | benchmark | demo`` (argument parsing and output).

Exit codes: 0 success, 2 a TSKD error (bad input, configuration, existing output), 130 stopped
by Ctrl-C or SIGTERM (the run is resumable: run the same command again).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _reporter(args):
    from TSKDLib.pipeline.progress import ProgressReporter
    return ProgressReporter(json_lines=bool(getattr(args, "progress_json", False)),
                            quiet=bool(getattr(args, "quiet", False)))


def _labelled_slices(values: list[str] | None, n_images: int):
    from TSKDLib.cli.args import parse_slices_arg
    if not values:
        return None
    if len(values) == 1 and n_images > 1:
        values = values * n_images
    return [None if v.strip().lower() in ("", "auto", "none") else parse_slices_arg(v) for v in values]


def cmd_train(args) -> int:
    from TSKDLib.pipeline.run import train

    progress = _reporter(args)
    result = train(args.images, args.labels, out=args.out, preset=args.preset, class_map=args.class_map,
                   classes=args.classes, labelled_slices=_labelled_slices(args.labelled_slices, len(args.images or [])),
                   config=args.config, overwrite=args.overwrite, device=args.device, threads=args.threads,
                   progress=progress, synthesis=False if args.no_synthesis else (True if args.synthesis else None), axis=args.axis)
    from TSKDLib.engine.distributed import is_main
    if not args.progress_json and is_main():  # one summary under torchrun
        print(f"model package: {result.model_dir}")
        for stage, sec in result.timings.items():
            print(f"  {stage:>13}: {sec:.1f} s")
    return 0


def cmd_segment(args) -> int:
    from TSKDLib.pipeline.run import segment

    progress = _reporter(args)
    outputs = segment(args.model_dir, args.images, out=args.out, fmt=args.format, cleanup=not args.no_cleanup,
                      overwrite=args.overwrite, progress=progress, device=args.device,
                      largest_component=args.largest_component, axis=args.axis,
                      all_components=args.all_components)
    if not args.progress_json:
        for o in outputs:
            check = ", ".join(map(str, o["check_slices"]))
            done = o.get("corrected_slices") or []
            print(f"{o['output']}  ({o['seconds']:.2f} s)  check first: slice{'s' * (len(o['check_slices']) > 1)} {check}"
                  + (f"  (corrected before: {', '.join(map(str, done))})" if done else ""))
            factor = o.get("intensity_factor", 1.0)
            if factor != 1.0:
                print(f"  intensities scaled x{factor:.2f}: the model's classes came out "
                      f"{'darker' if factor > 1 else 'brighter'} than in its training scans, so the scan "
                      "was segmented again as bright as those")
        if outputs and any(o["check_slices"] for o in outputs):
            print("  (the slices most likely wrong, file's own slice numbers; correct them and run "
                  "`tskd update MODEL --image SCAN --labels CORRECTED --slices ...`)")
    return 0


def cmd_info(args) -> int:
    from TSKDLib.deploy.inference import load_model_package
    from TSKDLib.pipeline.run import resolve_model_dir

    card = load_model_package(resolve_model_dir(args.model_dir)).card
    if args.json:
        print(json.dumps(card, indent=1))
        return 0
    print(f"model: {card.get('name', Path(args.model_dir).name)}  (created {card.get('created')})")
    print(f"student: {card.get('student', {}).get('arch')}  input {card.get('input_size')} px, "
          f"{card.get('slice_axis')} slices")
    dice = (card.get("validation") or {}).get("dice") or {}
    for c in card.get("classes", []):
        d = dice.get(c["name"])
        print(f"  {c['index']:>2} {c['name']:<20} value {c['value']:<4} colour {tuple(c['color'])}"
              + (f"  Dice on labelled slices {d:.3f}" if isinstance(d, (int, float)) and d == d else ""))
    tv = (card.get("validation") or {}).get("teacher_val_dice")
    if isinstance(tv, (int, float)):
        print(f"teacher validation Dice (held-out labelled slices): {tv:.3f}")
    return 0


def cmd_export(args) -> int:
    from TSKDLib.pipeline.run import copy_model_package

    dest = copy_model_package(args.source, args.dest, overwrite=args.overwrite)
    print(f"exported {args.source} -> {dest}")
    return 0


def cmd_demo(args) -> int:
    from TSKDLib.pipeline.demo import run_demo

    return run_demo(args.data, out=args.out, preset=args.preset, overwrite=args.overwrite, device=args.device,
                    progress=_reporter(args))


def cmd_benchmark(args) -> int:
    from TSKDLib.cli.benchmark_cli import run_benchmark_cli

    return run_benchmark_cli(args)


def add_pipeline_commands(sub) -> None:
    """Register the pipeline subcommands on the ``tskd`` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--progress-json", action="store_true",
                        help="print one JSON object per line on stdout (schema: docs/design.md)")
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    common.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    t = sub.add_parser("train", parents=[common], help="fine-tune the teacher, synthesise, distil and export a student",
                       description="prepare -> teacher fine-tune (LoRA) -> synthesis (diffusion) -> distillation -> "
                                   "export. Running the same command again on the same --out resumes it.")
    t.add_argument("images", nargs="*", help="scans (volume files, DICOM folders, 2D images)")
    t.add_argument("--labels", nargs="+", default=[], help="one label file per scan (.seg.nrrd or label volume)")
    t.add_argument("--class-map", help="JSON {value: name} for label volumes")
    t.add_argument("--classes", nargs="+", help="class names to learn (default: all in the class map)")
    t.add_argument("--labelled-slices", action="append",
                   help="labelled slice indices: the file's own slice indices along the slice axis (--axis), "
                        "e.g. 2,7,12-14; repeat once per scan; "
                        "default: every slice holding a label")
    t.add_argument("--out", required=True, help="run directory")
    from TSKDLib.pipeline.presets import PRESET_NAMES
    t.add_argument("--preset", default=None, choices=PRESET_NAMES,
                   help="size of every stage (TSKDLib/pipeline/presets.py); given, it wins over the preset in --config "
                        "(default: the --config file's, else fast)")
    t.add_argument("--config", help="JSON config file (see RUN_DIR/config.json of a run)")
    t.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    syn = t.add_mutually_exclusive_group()
    syn.add_argument("--synthesis", action="store_true",
                     help="run the diffusion synthesis stage (off by default: no synthetic slice passed the "
                          "teacher check at the fast or balanced budgets, CPU or GPU; benchmarks/RESULTS.md)")
    syn.add_argument("--no-synthesis", action="store_true", help="skip the diffusion synthesis stage")
    from TSKDLib.cli.args import add_axis_argument
    add_axis_argument(t, default=None, help="slice axis: acquisition (default: each scan's own slices, the voxel "
                      "axis the file stacks, even when oblique), or axial, coronal, sagittal for near-isotropic "
                      "volumes; recorded in the model package")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("segment", parents=[common], help="segment scans with a trained student model package")
    s.add_argument("model_dir", help="model package (RUN_DIR/model) or a run directory")
    s.add_argument("images", nargs="+", help="scans to segment")
    s.add_argument("--out", required=True,
                   help="output file (one scan: .nii.gz, .nrrd or .seg.nrrd) or folder (several scans)")
    s.add_argument("--format", default=None, choices=["nii.gz", "nrrd", "seg.nrrd"],
                   help="output format inside an output folder (default seg.nrrd)")
    s.add_argument("--no-cleanup", action="store_true",
                   help="skip 3D clean-up (small islands, holes, small or misplaced parts of one-object classes)")
    s.add_argument("--largest-component", action="store_true",
                   help="keep only the largest connected component of each class")
    s.add_argument("--all-components", action="store_true",
                   help="keep every connected component, also of the classes the model learnt as one "
                        "object (model_card.json postprocessing.one_object)")
    add_axis_argument(s, default=None, help="the model's slice axis (recorded in the model package); giving "
                      "another one is an error")
    s.set_defaults(func=cmd_segment)

    i = sub.add_parser("info", help="show a model package's classes, validation Dice and provenance")
    i.add_argument("model_dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("export", help="copy a model package (from a run or model directory) to DEST, verified")
    e.add_argument("source", help="run directory or model package")
    e.add_argument("dest", help="destination folder (must not exist unless --overwrite)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", parents=[common], help="train on 4 labelled slices of the bundled CT, segment it, "
                                                     "print Dice on the other slices")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--data", default="Testing/Data/totalseg",
                   help="the demo data folder (default Testing/Data/totalseg: run from a TSKD checkout's root)")
    d.add_argument("--preset", default="fast", choices=PRESET_NAMES)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("benchmark", parents=[common], help="compare scratch, task-agnostic KD, TS-KD without "
                                                          "and with synthesis, and the teacher")
    from TSKDLib.cli.benchmark_cli import add_benchmark_arguments
    add_benchmark_arguments(b)
    b.set_defaults(func=cmd_benchmark)
