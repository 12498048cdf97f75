"""Issue 15: slices whose *reference* label is wrong in the CHAOS MR dev scans, and what they do
to the sparse-slice figures.

    python benchmarks/reference_defects.py --find
    python benchmarks/reference_defects.py --scans 31 --seeds 0 1 2 --out bench/defects31 \
        [--swap] [--work-dir bench/work_noval] [--data ../shared/data/chaos_mr_t2_dev]
    python benchmarks/reference_defects.py --scans 31 32 33 34 36 --groups 2,3,4 --methods tskd_nosyn \
        --out bench/defects_g234

``--find`` lists, per dev scan, the label slices that repeat the slice before them (the files were
resampled along the slice axis with nearest neighbour: every ~7th label slice is a copy) and the
*dips*: a slice where an organ's area falls below 20 % of the smaller of its two neighbours (both
>= 300 pixels), i.e. an organ missing from the reference inside its extent.

The run mode is the sparse-slice protocol (``TSKDLib.evaluation.sparse_benchmark``, ``fast``,
teacher with ``val_fraction 0``, ``--within-only``) on the given scans, with one more scoring
region, ``within_valid``: the unlabelled slices minus the dips (and the label slices identical to
them); with ``--groups``, the scans outside a group are scored as ``other`` and, without their
defective slices, ``other_valid``. ``--swap`` moves a protocol pick that falls on a dip to the nearest slice that is neither
a dip nor a copy of one, as a radiologist labelling the organ there would draw it (the pick and
its neighbour are one slice, 7.7 mm, apart); give it a ``--work-dir`` of its own, where the teacher
is trained anew (the work folders are kept per scan and seed, not per labelled slices).
Prints the tables (``within`` and ``within_valid``, after ``tskd segment``'s clean-up) and writes
``results.csv`` to ``--out``. Results: benchmarks/RESULTS.md, section 6, "A defect in the
reference labels". CHAOS data stay outside the project (SOURCE.md).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from chaos import DEFAULT_DIR, SCANS, load_scan

import TSKDLib.evaluation.sparse_benchmark as sparse
from TSKDLib.evaluation.metrics import summarise_seeds


def find_defects(labels: np.ndarray, num_classes: int, min_area: int = 300, ratio: float = 0.2) -> dict:
    """``{"copies": [z, ...], "dips": [(z, class, area, (area below, area above)), ...]}`` of a
    ``(Z, H, W)`` reference: ``copies`` are slices identical to slice ``z - 1`` (with any label);
    a dip is class ``k`` on slice ``z`` with an area below ``ratio`` x the smaller of its two
    neighbours (the nearest slices that are not copies of ``z``), both at least ``min_area`` pixels."""
    copies = [z for z in range(1, len(labels)) if labels[z].any() and np.array_equal(labels[z], labels[z - 1])]
    dips = []
    for k in range(1, num_classes + 1):
        area = (labels == k).reshape(len(labels), -1).sum(1)
        for z in range(1, len(labels) - 1):
            below, above = z - 1, z + 1  # the neighbours, past copies of slice z
            while below > 0 and np.array_equal(labels[below], labels[z]):
                below -= 1
            while above < len(labels) - 1 and np.array_equal(labels[above], labels[z]):
                above += 1
            low = min(area[below], area[above])
            if low >= min_area and area[z] < ratio * low:
                dips.append((z, k, int(area[z]), (int(area[below]), int(area[above]))))
    return {"copies": copies, "dips": dips}


def bad_slices(labels: np.ndarray, num_classes: int) -> list[int]:
    """The dips' slices and the label slices identical to them (one defective slice of the original
    file, copied by the resampling), sorted."""
    found = find_defects(labels, num_classes)
    bad = {z for z, *_ in found["dips"]}
    for z in sorted(bad):
        for n in (z - 1, z + 1):
            if 0 <= n < len(labels) and np.array_equal(labels[n], labels[z]):
                bad.add(n)
    return sorted(bad)


def _patch(defects: dict[str, list[int]], swap: bool) -> None:
    """Score ``within_valid`` and ``other_valid`` too (the regions without the defective slices;
    on a scan without any, the same slices as ``within``/``other``; HD95 there stacks the kept
    slices as if adjacent, so read its Dice); with ``swap``, move picks off the defective slices."""
    original_within, original_picks = sparse._Scorer.within, sparse._with_sparse_labels

    def within(self, method, predict_case_fn, proba=None):
        preds: dict = {}  # each case predicted once, for both scorings

        def predict_once(ci, case):
            if ci not in preds:
                preds[ci] = predict_case_fn(ci, case)
            return preds[ci]

        original_within(self, method, predict_once, proba)
        for ci, case in enumerate(self.train_cases):
            mask = sparse.region_masks(case.num_slices, self.picks[case.name])["within"]
            mask[defects.get(case.name, [])] = False
            for name, p in self._variants(method, predict_once(ci, case), case, proba):
                for region, scores in sparse.score_regions(p, case.label_slices(), self.k, sparse._spacing(case),
                                                           {"within_valid": mask}).items():
                    self.add(name, case, region, scores)

    def with_sparse_labels(case, per_class):
        case2, picks = original_picks(case, per_class)
        bad = set(defects.get(case.name, []))
        if not swap or not bad & set(picks):
            return case2, picks
        from TSKDLib.data.case import with_labelled
        moved = []
        for z in picks:
            if z in bad:
                z = min((n for n in range(case.num_slices) if n not in bad and n not in picks and n not in moved),
                        key=lambda n: abs(n - z))
            moved.append(z)
        flags = np.zeros(case.num_slices, bool)
        flags[moved] = True
        print(f"{case.name}: labelled slices {sorted(picks)} -> {sorted(moved)}")
        return with_labelled(case, flags), sorted(moved)

    original_other = sparse._Scorer.other

    def other(self, method, proba):
        preds: dict = {}  # each test scan predicted once, for both scorings
        predict = sparse._predict

        def predict_once(proba_, case, size):
            if case.name not in preds:
                preds[case.name] = predict(proba_, case, size)
            return preds[case.name]

        sparse._predict = predict_once
        try:
            original_other(self, method, proba)
        finally:
            sparse._predict = predict
        for case in self.tests:
            keep = np.setdiff1d(np.arange(case.num_slices), defects.get(case.name, []))
            ref = case.label_slices()[keep]
            for name, p in self._variants(method, predict_once(proba, case, self.cfg.size), case, proba):
                self.add(name, case, "other_valid", sparse.dice_hd95(p[keep], ref, self.k, sparse._spacing(case)))

    sparse._Scorer.within = within
    sparse._Scorer.other = other
    sparse._with_sparse_labels = with_sparse_labels


def _table(rows: list[dict]) -> str:
    acc: dict = {}
    for r in rows:
        for cls in (r["class"], "mean"):
            acc.setdefault((r["method"], r["region"], cls), {}).setdefault(r["seed"], []).append(r)
    s = summarise_seeds(acc)
    classes = list(dict.fromkeys(r["class"] for r in rows))
    lines = []
    for region in ("within", "within_valid", "other", "other_valid"):
        if not any(k[1] == region for k in s):
            continue
        lines += [f"## {region}", "| method | " + " | ".join(classes) + " | mean |", "|---" * (len(classes) + 2) + "|"]
        for m in dict.fromkeys(r["method"] for r in rows):
            if (m, region, "mean") in s:
                cells = [s[(m, region, c)] for c in classes + ["mean"]]
                lines.append(f"| {m} | " + " | ".join(
                    "" if math.isnan(v["dice_mean"]) else f"{v['dice_mean']:.3f} ± {v['dice_std']:.3f}" for v in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    ap.add_argument("--find", action="store_true", help="only list the copies and dips of every dev scan")
    ap.add_argument("--scans", type=int, nargs="+", default=[31])
    ap.add_argument("--groups", help="training groups, ';'-separated indices into --scans (e.g. '2,3,4' with "
                    "--scans 31 32 33 34 36: trained on three, the others scored as 'other'); default: each "
                    "scan alone, within only")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--swap", action="store_true", help="move labelled picks off the defective slices")
    ap.add_argument("--methods", nargs="+", default=["fill_between", "teacher", "tskd_nosyn"])
    ap.add_argument("--work-dir", default="bench/work_noval")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.find:
        for s in SCANS:
            case = load_scan(args.data, s)
            found = find_defects(case.label_slices(), case.class_map.num_classes)
            names = case.class_map.names
            dips = [f"slice {z} {names[k - 1]} {a} px (neighbours {n[0]}, {n[1]})" for z, k, a, n in found["dips"]]
            print(f"scan {s}: copies of the slice before: {found['copies']}; dips: {dips or 'none'}; "
                  f"defective slices: {bad_slices(case.label_slices(), case.class_map.num_classes)}")
        return
    if not args.out:
        ap.error("--out is required unless --find")
    torch.set_num_threads(2)
    scans = [load_scan(args.data, s) for s in args.scans]
    defects = {c.name: bad_slices(c.label_slices(), c.class_map.num_classes) for c in scans}
    print("defective slices:", json.dumps(defects))
    _patch(defects, args.swap)
    groups = ([[int(i) for i in g.split(",")] for g in args.groups.split(";")] if args.groups
              else [[i] for i in range(len(scans))])
    cfg = sparse.SparseConfig(seeds=args.seeds, train_groups=groups, preset="fast",
                              methods=args.methods, work_dir=args.work_dir, other_scans=bool(args.groups),
                              teacher_other=False, teacher={"val_fraction": 0.0})
    result = sparse.run_sparse_benchmark(scans, cfg, args.out)
    text = _table(result["rows"])
    (Path(args.out) / "defects.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
