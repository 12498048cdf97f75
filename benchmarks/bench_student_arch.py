"""Which student should be the default? Accuracy per CPU millisecond (issue 5).

Trains every student architecture with the same supervised budget (the ``fast`` distillation
preset's steps, method ``scratch`` so the teacher does not confound the comparison) on

- HC18: 20 labelled images of 20 subjects, tested on 40 images of 40 other subjects;
- the bundled DICOM CT: 4 labelled slices (liver, spleen), tested on the 16 other slices;

and measures onnxruntime CPU time per slice at S = 256. Prints Dice, ms/slice and Dice per ms.

    python benchmarks/bench_student_arch.py --archs unet-s unet unet-l
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TSKDLib.data.case import load_2d_cases, load_case, prepare_slices  # noqa: E402
from TSKDLib.distillation.distill import DistillConfig, TransferSet, distill, evaluate_dice  # noqa: E402
from TSKDLib.deploy.export import export_onnx  # noqa: E402


def hc18_sets(shared: Path, size: int):
    cases = [c for c in load_2d_cases(shared / "images", shared / "masks", shared / "labels.json")]
    by_subject = {}
    for c in cases:
        by_subject.setdefault(c.subject, c)  # first image of each subject
    subjects = sorted(by_subject)
    train = [by_subject[s] for s in subjects[:20]]
    test = [by_subject[s] for s in subjects[20:60]]
    return prepare_slices(train, size), prepare_slices(test, size)


def ct_sets(size: int):
    d = ROOT / "Testing" / "Data" / "totalseg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = load_case(d / "ct_dicom", d / "example_seg_dicom.nii.gz", d / "label_map_total_ct.json",
                         classes=["liver", "spleen"], labelled_slices=[2, 7, 12, 17])
    train = prepare_slices([case], size)
    full = load_case(d / "ct_dicom", d / "example_seg_dicom.nii.gz", d / "label_map_total_ct.json",
                     classes=["liver", "spleen"])
    test = prepare_slices([full], size).subset(~train.labelled)
    return train, test


def ms_per_slice(model, size: int, threads: int, repeats: int = 3) -> float:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "m.onnx", size)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((8, 1, size, size), dtype=np.float32)
        sess.run(None, {"image": x})
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, {"image": x})
            best = min(best, (time.perf_counter() - t0) / 8)
    return best * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["unet-s", "unet", "unet-l"])
    ap.add_argument("--hc18", default=str(ROOT.parent / "shared" / "data" / "hc18"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/student_arch.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from TSKDLib.engine.runtime import tune_allocator
    tune_allocator()  # as tskd train does (TSKDLib/engine/runtime.py)
    sets = {"CT": ct_sets(args.size)}
    if Path(args.hc18).is_dir():
        sets["HC18"] = hc18_sets(Path(args.hc18), args.size)
    cfg = DistillConfig.preset("fast", method="scratch", num_threads=args.threads)
    rows = []
    for arch in args.archs:
        row = {"arch": arch}
        for name, (train, test) in sets.items():
            t0 = time.monotonic()
            res = distill(TransferSet.build(train, include_unlabelled=False), cfg, student=arch)
            dice = evaluate_dice(res.model, test.images, test.labels, per_slice=(name == "HC18"),
                                 num_classes=train.class_map.num_classes)["mean"]
            row[name] = round(dice, 4)
            row[f"{name}_train_s"] = round(time.monotonic() - t0, 1)
            model = res.model
        row["params"] = sum(p.numel() for p in model.parameters())
        row["ms_per_slice"] = round(ms_per_slice(model, args.size, args.threads), 1)
        row["mean_dice"] = round(float(np.mean([row[n] for n in sets])), 4)
        row["dice_per_ms"] = round(row["mean_dice"] / row["ms_per_slice"], 5)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    best = max(rows, key=lambda r: r["dice_per_ms"])
    print(f"best accuracy per CPU ms: {best['arch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
