"""Issue 13 "label next": are the slices the student is least sure about better to label than
evenly spaced ones?

    python benchmarks/bench_label_next.py [--data ../shared/data/chaos_mr_t2_dev] [--scans 31 32 ...]

Protocol per CHAOS MR T2 scan (reference labels: liver, kidneys, spleen):

1. start: 3 labelled slices per organ (at 25/50/75 % of each organ's slice extent; their labels
   from the reference, every class on them);
2. a student (the ``unet-s`` student at S = ``--size``) is trained on them (supervised, ``scratch``
   method, ``--steps`` steps; no teacher: see the note below);
3. "label next" ranks the remaining slices by the student's mean per-pixel entropy (the rule of
   ``TSKDSlicerLib.interactive.rank_slices``: most uncertain first, at least 2 slices apart from
   each other and from labelled slices) and takes 5; the baseline takes 5 slices evenly spaced over
   the labelled extent (``evenly_spaced``; ``--baseline-extent scan``: over the whole scan);
4. the student is fine-tuned from step 2 on 3+5 labelled slices (same budget for both), and the
   mean Dice over the 4 organs is measured on the slices labelled in *neither* set (the reference).

Note: to fit the shared 2-core CPU this uses the supervised student alone, not the full TS-KD
pipeline (teacher fine-tuning per scan and condition would take hours); the ranking is the
student's own uncertainty, as in Slicer. Prints one line per scan and the mean difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "TSKDSlicer"))


def _entropy(model, images, valid) -> np.ndarray:
    import torch

    with torch.no_grad():
        p = torch.softmax(model(images.float()), 1).clamp_min(1e-12)
        ent = -(p * p.log()).sum(1)
        return ((ent * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)).numpy()




def run_scan(data: Path, scan: str, size: int, steps: int, ft_steps: int, seed: int,
             baseline: str = "labelled") -> dict:
    import torch

    from TSKDLib.data.case import load_case, prepare_slices
    from TSKDLib.distillation.distill import DistillConfig, TransferSet, distill, dice_scores, predict_labels
    from TSKDSlicerLib.interactive import evenly_spaced, rank_slices

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = load_case(data / "images" / f"image_{scan}.nii.gz", data / "labels" / f"label_{scan}.nii.gz",
                         data / "labels.json")
    full = prepare_slices([case], size)  # every slice with its reference labels
    n, k = len(full), full.class_map.num_classes
    start = set()
    for c in range(1, k + 1):
        present = [i for i in range(n) if bool((full.labels[i] == c).any())]
        if present:
            for q in (0.25, 0.5, 0.75):
                start.add(present[min(len(present) - 1, int(round(q * (len(present) - 1))))])
    start = sorted(start)
    cfg = DistillConfig(method="scratch", steps=steps, finetune_steps=0, batch_size=8, min_steps=steps,
                        seed=seed, device="cpu", checkpoint_every=10**9, augment=True)
    t0 = time.perf_counter()
    base = distill(TransferSet.build(full.with_labelled(start)), cfg, None, "unet-s").model.eval()
    ent = _entropy(base, full.images, full.valid.float())
    scores = {i: float(ent[i]) for i in range(n)}
    suggested = rank_slices(scores, start, count=5, min_gap=2)
    extent = (min(start), max(start)) if baseline == "labelled" else (0, n - 1)
    even = evenly_spaced(n, start, 5, extent)
    out = {"scan": scan, "slices": n, "start": start, "suggested": suggested, "even": even}
    held = [i for i in range(n) if i not in set(start) | set(suggested) | set(even)]
    ft = DistillConfig(method="scratch", steps=ft_steps, finetune_steps=0, batch_size=8, min_steps=ft_steps,
                       seed=seed, device="cpu", checkpoint_every=10**9, lr=1e-3)
    import copy

    for name, extra in (("suggested", suggested), ("even", even)):
        model = distill(TransferSet.build(full.with_labelled(start + extra)), ft, None, copy.deepcopy(base)).model.eval()
        pred = predict_labels(model, full.images[held].float())
        d = dice_scores(pred, full.labels[held], k)
        out[name + "_dice"] = float(np.mean(d["per_class"]))
    pred = predict_labels(base, full.images[held].float())
    out["start_dice"] = float(np.mean(dice_scores(pred, full.labels[held], k)["per_class"]))
    out["seconds"] = time.perf_counter() - t0
    torch.set_num_threads(torch.get_num_threads())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chaos_mr_t2_dev"))
    p.add_argument("--scans", nargs="+", default=["31", "32", "33", "34", "36"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline-extent", choices=["labelled", "scan"], default="labelled",
                   help="evenly spaced over the labelled extent (first to last labelled slice) or the whole scan")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for scan in args.scans:
        r = run_scan(Path(args.data), scan, args.size, args.steps, args.finetune_steps, args.seed,
                     args.baseline_extent)
        rows.append(r)
        print(f"scan {scan}: {r['slices']} slices, start {r['start']}; label next {r['suggested']} -> mean Dice "
              f"{r['suggested_dice']:.3f}; evenly spaced {r['even']} -> {r['even_dice']:.3f} "
              f"(3 per organ only: {r['start_dice']:.3f}; {r['seconds']:.0f} s)", flush=True)
    diffs = [r["suggested_dice"] - r["even_dice"] for r in rows]
    print(f"mean over {len(rows)} scans: label next {statistics.mean(r['suggested_dice'] for r in rows):.3f}, "
          f"evenly spaced {statistics.mean(r['even_dice'] for r in rows):.3f}, difference {statistics.mean(diffs):+.3f} "
          f"(label next better on {sum(d > 0 for d in diffs)} of {len(diffs)})")


if __name__ == "__main__":
    main()
