"""Issue 15: where a model trained on some CHAOS MR scans goes wrong on a new scan, slice by slice.

    python benchmarks/new_scan_slices.py --train 31 32 33 --test 36 [--seed 0] \
        [--data ../shared/data/chaos_mr_t2_dev] [--work-dir bench/work_noval] [--out bench/new_scan]

Runs the sparse-slice protocol (3 labelled slices per organ on each training scan, ``fast``
preset, teacher with ``val_fraction 0`` as ``tskd train``'s refit; ``teacher`` and
``tskd_nosyn``), keeps the raw predictions on the test scans, and prints for each slice of
``--test`` and each organ the reference area, the predicted area and their overlap (pixels), for
the teacher and the student, plus what the student calls the reference's voxels of each organ.
Scores go to ``--out`` (results.md). Results: benchmarks/RESULTS.md, section 6, "What limits new
scans".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from chaos import DEFAULT_DIR, SCANS, load_scan

import TSKDLib.evaluation.sparse_benchmark as sparse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, nargs="+", default=[31, 32, 33])
    ap.add_argument("--test", type=int, default=36)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    ap.add_argument("--work-dir", default="bench/work_noval")
    ap.add_argument("--out", default="bench/new_scan")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    scans = [load_scan(args.data, i) for i in SCANS]
    kept: dict[tuple[str, str], np.ndarray] = {}
    score = sparse._Scorer._variants

    def keep(self, method, pred, case):  # every raw prediction passes here before it is scored
        kept[(method, case.name)] = np.array(pred)
        return score(self, method, pred, case)

    sparse._Scorer._variants = keep
    cfg = sparse.SparseConfig(seeds=[args.seed], train_groups=[[SCANS.index(i) for i in args.train]], preset="fast",
                              methods=["teacher", "tskd_nosyn"], work_dir=args.work_dir, teacher_other=True,
                              other_scans=True, teacher={"val_fraction": 0.0})
    sparse.run_sparse_benchmark(scans, cfg, args.out)
    case = scans[SCANS.index(args.test)]
    ref = case.label_slices()
    names = case.class_map.names
    for method in ("teacher", "tskd_nosyn"):
        pred = kept[(method, case.name)]
        print(f"== {method} on image_{args.test}: per slice, organ: reference / predicted / overlap (pixels)")
        for z in range(len(ref)):
            cells = []
            for k, name in enumerate(names, start=1):
                r, p = ref[z] == k, pred[z] == k
                cells.append(f"{name} {int(r.sum()):5d}/{int(p.sum()):5d}/{int((r & p).sum()):5d}")
            calls = {}  # reference organ -> {what the model calls its pixels instead: count}
            for k, name in enumerate(names, start=1):
                wrong = np.bincount(pred[z][ref[z] == k].ravel(), minlength=len(names) + 1)
                wrong[k] = 0
                if wrong.any():
                    calls[name] = {("bg" if j == 0 else names[j - 1]): int(c) for j, c in enumerate(wrong) if c}
            print(f"{z:3d} " + " | ".join(cells) + (f"   reference called: {calls}" if calls else ""))
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
