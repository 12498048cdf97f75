"""Issue 15: settings of the student's MR intensity augmentation on CHAOS MR (new scans vs the
training scans' own unlabelled slices).

    python benchmarks/aug_variants.py --bias-sd 0.25 --window 0.1 0.25 --p 0.5 --out bench/aug_both \
        [--data ../shared/data/chaos_mr_t2_dev] [--groups 0,1,2] [--work-dir bench/work_noval]

Runs the sparse-slice protocol (``TSKDLib.evaluation.sparse_benchmark``: 3 labelled slices per
organ; ``tskd_nosyn`` student; scored within the training scans and on the other scans, raw and
after ``tskd segment``'s clean-up) with :func:`TSKDLib.distillation.distill.mr_intensity_augment`
replaced by the given settings (``--bias-sd 0 --window 0 0`` turns it into a no-op). The teacher is
trained with ``val_fraction 0`` (the refit teacher's weights) and kept in ``--work-dir``, so the
variants share one teacher. Writes ``results.md`` / ``results.csv`` to ``--out`` and prints the
tables. Results: benchmarks/RESULTS.md, section 6, "MR intensity augmentation".
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from chaos import DEFAULT_DIR, SCANS, load_scan

import TSKDLib.distillation.distill as distill_module
from TSKDLib.evaluation.sparse_benchmark import SparseConfig, run_sparse_benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    ap.add_argument("--bias-sd", type=float, default=0.25, help="SD of the 4 x 4 log bias field")
    ap.add_argument("--window", type=float, nargs=2, default=(0.1, 0.25), metavar=("LOW", "HIGH"),
                    help="range of the window's low end (+-LOW) and high end (1 +- HIGH)")
    ap.add_argument("--p", type=float, default=0.5, help="probability of each change per sample")
    ap.add_argument("--groups", default="0,1,2", help="training groups, ';'-separated (indices into 31 32 33 34 36)")
    ap.add_argument("--within-only", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="distillation step cap (default: the fast preset's)")
    ap.add_argument("--work-dir", default="bench/work_noval")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    distill_module.mr_intensity_augment = functools.partial(
        distill_module.mr_intensity_augment, bias_sd=args.bias_sd, window_low=args.window[0],
        window_high=args.window[1], p=args.p)
    torch.set_num_threads(args.threads)
    scans = [load_scan(args.data, i) for i in SCANS]
    groups = [[int(i) for i in g.split(",")] for g in args.groups.split(";")]
    cfg = SparseConfig(seeds=[0], train_groups=groups, preset="fast", methods=["tskd_nosyn"], work_dir=args.work_dir,
                       teacher_other=False, other_scans=not args.within_only, teacher={"val_fraction": 0.0},
                       distillation={"mr_augment": True, **({"steps": args.steps} if args.steps else {})})
    run_sparse_benchmark(scans, cfg, args.out)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
