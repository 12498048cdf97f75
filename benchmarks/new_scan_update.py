"""Issue 15: what a radiologist does when a model fails on a new scan: correct a few slices and
run ``tskd update``. How much of the new scan does that fix, and in how long?

    python benchmarks/new_scan_update.py [--train 31 32 33] [--test 36 34] [--corrected 3] \
        [--choose oracle|review] [--seed 0] [--rounds 1] [--data ../shared/data/chaos_mr_t2_dev] [--out bench/new_scan_update]

1. ``tskd train --preset fast`` on the training scans, each with 3 labelled slices per organ (the
   slices at 25/50/75 % of its extent, every organ labelled on them: the sparse-slice protocol);
   product defaults otherwise. Reused when ``--out``/train/model exists.
2. ``tskd segment`` of each test scan with that model (default 3D clean-up).
3. The user corrects ``--corrected`` slices, at least 3 apart (their full reference labels stand
   in for the correction), chosen by ``--choose``: ``oracle`` (default), the slices with the most
   voxels where the prediction differs from the reference (which a user can only guess);
   ``review``, the slices ``tskd segment`` names to check first
   (:class:`TSKDLib.deploy.inference.SliceReview`, the model's own estimate).
4. ``tskd update`` with those slices (default 150 + 40 steps), then ``tskd segment`` again.
5. With ``--rounds N``, steps 3-4 repeat as a user would when the result is still wrong: the next
   slices are chosen on the updated model's output, never a slice corrected before, and ``tskd
   update`` starts from the updated model with every slice corrected so far (the user's labels
   file keeps them all). Each round is scored on the slices corrected in none of the rounds so far,
   against the first model on the same slices.

Slice numbers are the files' own k indices, which on these axial CHAOS files are also the order of
``Case.label_slices()`` (checked on all five scans: no flip), so one index serves ``tskd`` and
the scoring.

Prints per test scan the Dice per organ on the slices nobody corrected, before and after, the
corrected slice numbers and the update's wall time. Slices whose reference misses an organ
(``reference_defects.bad_slices``: scan 31's spleen on slices 17-18) are neither corrected nor scored. Results: benchmarks/RESULTS.md, section 6,
"Other scans: which three scans train, and correcting a new scan". CHAOS data stay outside the
project (SOURCE.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from chaos import DEFAULT_DIR, load_scan, scan_files
from reference_defects import bad_slices

from TSKDLib.data.case import load_case
from TSKDLib.deploy.inference import Cleanup, load_model_package, segment_image
from TSKDLib.evaluation.metrics import dice_scores
from TSKDLib.evaluation.sparse_benchmark import sparse_slice_indices


def _tskd(*args: str) -> float:
    """Run one ``tskd`` command (this interpreter), raise on failure; returns its wall seconds."""
    t0 = time.perf_counter()
    quiet = ["--quiet"] if args[0] != "update" else []  # tskd update has no --quiet
    done = subprocess.run([sys.executable, "-m", "TSKDLib", *args, *quiet], check=False, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"tskd {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def worst_slices(pred: np.ndarray, ref: np.ndarray, n: int, gap: int = 3, exclude=()) -> list[int]:
    """The ``n`` slices ``(Z, Y, X)`` with the most voxels where ``pred`` and ``ref`` disagree, at
    least ``gap`` slices apart (the ones a user would correct first), sorted; never one of
    ``exclude`` (slices whose reference is wrong: a user would not "correct" an organ away)."""
    errors = (pred != ref).reshape(len(ref), -1).sum(1)
    chosen: list[int] = []
    for z in np.argsort(-errors, kind="stable"):
        if len(chosen) == n or errors[z] == 0:
            break
        if int(z) not in exclude and all(abs(int(z) - c) >= gap for c in chosen):
            chosen.append(int(z))
    return sorted(chosen)


def review_slices(model: Path, image: str, n: int, exclude=()) -> list[int]:
    """The ``n`` slices ``tskd segment`` names to check first (:meth:`SliceReview.worst`, default
    clean-up), never one of ``exclude`` (file slice numbers: the slices corrected in earlier rounds,
    which ``tskd segment`` skips itself, and the reference's defective slices), sorted."""
    pkg = load_model_package(model)
    found: dict = {}
    segment_image(pkg, image, cleanup=Cleanup.for_package(pkg),
                  review=found)
    return sorted(found["slices"].worst(n, exclude=exclude))


def _labels(data: Path, scan: int, label_file: Path) -> np.ndarray:
    """``(Z, Y, X)`` class indices of ``label_file`` on CHAOS scan ``scan``'s grid, in slice order."""
    return np.asarray(load_case(scan_files(data, scan)[0], label_file, data / "labels.json").label_slices())


def _scores(pred: np.ndarray, ref: np.ndarray, skip: list[int], num_classes: int) -> dict:
    """Volume Dice per class (:func:`TSKDLib.evaluation.metrics.dice_scores`) on the slices not in ``skip``."""
    keep = np.setdiff1d(np.arange(len(ref)), skip)
    return dice_scores(pred[keep], ref[keep], num_classes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, nargs="+", default=[31, 32, 33])
    ap.add_argument("--test", type=int, nargs="+", default=[36, 34])
    ap.add_argument("--corrected", type=int, default=3, help="slices the user corrects per test scan")
    ap.add_argument("--choose", choices=["oracle", "review"], default="oracle",
                    help="which slices the user corrects: the worst (oracle) or those tskd segment names")
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    ap.add_argument("--out", default="bench/new_scan_update")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--seed", type=int, default=0, help="tskd train's seed (a --config file {\"seed\": N})")
    ap.add_argument("--rounds", type=int, default=1,
                    help="correction rounds: each corrects --corrected more slices (chosen on the last model) "
                         "and runs tskd update from the last model with every slice corrected so far")
    args = ap.parse_args(argv)
    out, data = Path(args.out), Path(args.data)
    class_map = str(data / "labels.json")
    model = out / "train" / "model"
    if not (model / "model_card.json").is_file():
        cmd = ["train", *[str(scan_files(data, s)[0]) for s in args.train], "--labels",
               *[str(scan_files(data, s)[1]) for s in args.train], "--class-map", class_map]
        for s in args.train:
            case = load_scan(data, s)
            idx = sparse_slice_indices(case.label_slices(), case.class_map.num_classes)
            cmd += ["--labelled-slices", ",".join(map(str, idx))]
        if args.seed != 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "seed.json").write_text(json.dumps({"seed": args.seed}))
            cmd += ["--config", str(out / "seed.json")]
        seconds = _tskd(*cmd, "--out", str(out / "train"), "--preset", "fast", "--threads", args.threads)
        print(f"tskd train on {args.train}: {seconds:.0f} s")
    for scan in args.test:
        case = load_scan(data, scan)
        names, ref = case.class_map.names, np.asarray(case.label_slices())
        image, labels = (str(p) for p in scan_files(data, scan))
        before_file = out / f"seg_{scan}_before.nii.gz"
        _tskd("segment", str(model), image, "--out", str(before_file), "--overwrite")
        first = _labels(data, scan, before_file)
        defective = bad_slices(ref, len(names))  # reference slices missing an organ (scan 31's spleen)
        current, pred, fixed = model, first, []
        tag = "" if args.choose == "oracle" else f"_{args.choose}"  # the file names of earlier passes
        for rnd in range(1, args.rounds + 1):
            if args.choose == "oracle":
                new = worst_slices(pred, ref, args.corrected, exclude=defective + fixed)
            else:
                new = review_slices(current, image, args.corrected, exclude=defective + fixed)
            fixed = sorted(fixed + new)  # the user's labels file keeps every correction so far
            suffix = "" if rnd == 1 else f"_round{rnd}"
            update_dir = out / f"model_{scan}{tag or '_updated'}{suffix}"
            after_file = out / f"seg_{scan}_after{tag}{suffix}.nii.gz"
            seconds = _tskd("update", str(current), "--image", image, "--labels", labels, "--class-map", class_map,
                            "--slices", ",".join(map(str, fixed)), "--out", str(update_dir), "--overwrite",
                            "--threads", args.threads)
            _tskd("segment", str(update_dir), image, "--out", str(after_file), "--overwrite")
            current, pred = update_dir, _labels(data, scan, after_file)
            before = _scores(first, ref, fixed + defective, len(names))
            after = _scores(pred, ref, fixed + defective, len(names))
            head = f"image_{scan}" + ("" if rnd == 1 else f" round {rnd}")
            print(f"{head}: corrected slices {fixed} ({args.choose}); tskd update {seconds:.0f} s; Dice of the first "
                  f"model -> this round's on the other {len(ref) - len(fixed) - len(defective)} slices"
                  + (f" (not the defective {defective})" if defective else ""), flush=True)
            for name, b, a in zip(names, before["per_class"], after["per_class"]):
                print(f"  {name:14s} {b:.3f} -> {a:.3f}")
            print(f"  {'mean':14s} {before['mean']:.3f} -> {after['mean']:.3f}", flush=True)

if __name__ == "__main__":
    main()
