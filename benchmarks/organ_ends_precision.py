"""Issue 15: what the organ-ends rule removes from the teacher's pseudo-labels, against the expert
labels (CHAOS MR): voxels of the class per the reference ("true organ removed") and voxels of
anything else ("false positives removed").

    python benchmarks/organ_ends_precision.py bench/work_noval/image_31+image_32+image_33_seed0 ... \
        [--data ../shared/data/chaos_mr_t2_dev]

Each argument is an experiment folder of the sparse-slice benchmark's ``--work-dir`` (it holds
``slices.pt`` and ``teacher_cache/probs.npy``). The pseudo-labels are computed twice with
:func:`TSKDLib.distillation.distill.teacher_pseudo_labels` (``organ_ends`` off / on, everything
else as in training), and the voxels that lose their class are scored against the scan's complete
reference labels (slice order = the benchmark's). Prints one line per experiment, scan and class
with voxels removed, and the totals. Results: benchmarks/RESULTS.md, section 6, "What limits new scans".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from chaos import DEFAULT_DIR, load_scan

from TSKDLib.data.case import SliceSet
from TSKDLib.distillation.distill import TransferSet, teacher_pseudo_labels


def removed_by_organ_ends(work: Path, reference) -> dict[tuple[str, str], tuple[int, int]]:
    """``{(scan, class): (true organ voxels removed, other voxels removed)}`` for one experiment
    folder; ``reference(scan_name)`` -> ``(N, H, W)`` reference labels in slice order."""
    slices = SliceSet.load(work / "slices.pt")
    transfer = TransferSet.build(slices)
    probs = np.load(work / "teacher_cache" / "probs.npy", mmap_mode="r")
    before, _ = teacher_pseudo_labels(probs, transfer, organ_ends=False)
    after, _ = teacher_pseudo_labels(probs, transfer, organ_ends=True)
    out = {}
    for ci, name in enumerate(slices.case_names):
        ref = reference(name)
        rows = torch.nonzero(transfer.case_index == ci).flatten().tolist()
        for k, cls in enumerate(slices.class_map.names, start=1):
            true = other = 0
            for r in rows:
                gone = ((before[r] == k) & (after[r] != k)).numpy()
                if gone.any():
                    rz = ref[int(transfer.slice_index[r])]
                    if rz.shape != gone.shape:
                        raise ValueError(f"{name}: reference slice {rz.shape} vs model slice {gone.shape}; "
                                         "this script needs scans at the model's input size (CHAOS: 256).")
                    true += int((gone & (rz == k)).sum())
                    other += int((gone & (rz != k)).sum())
            if true or other:
                out[(name, cls)] = (true, other)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", nargs="+", help="experiment folders of the benchmark's --work-dir")
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    args = ap.parse_args(argv)
    labels: dict[str, np.ndarray] = {}

    def reference(name: str) -> np.ndarray:
        if name not in labels:  # each scan read once; the array keeps its image (Case.label_slices)
            labels[name] = load_scan(args.data, int(name.split("_")[-1])).label_slices()
        return labels[name]

    total_true = total_other = 0
    for w in args.work:
        for (scan, cls), (true, other) in removed_by_organ_ends(Path(w), reference).items():
            print(f"{Path(w).name:36s} {scan:9s} {cls:13s} true organ removed {true:7d}   other removed {other:7d}")
            total_true, total_other = total_true + true, total_other + other
    share = total_other / max(total_true + total_other, 1)
    print(f"total: true organ removed {total_true}, other removed {total_other} ({100 * share:.1f} % of the "
          "removed voxels were not the organ)")


if __name__ == "__main__":
    main()
