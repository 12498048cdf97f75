"""Benchmark of the synthesis stage (issue 4): mask-conditioned vs unconditional diffusion.

For each dataset (bundled 20-slice DICOM CT; bundled HC18 ultrasound, 40 images) this fine-tunes
the teacher with its ``fast`` preset (LiteMedSAM + LoRA, cached in ``--out``), then runs
:func:`TSKDLib.synthesis.run_synthesis` once per conditioning mode and prints:
training time, sampling time per image (CPU), teacher labelling time per image, intensity
histogram distance to the real slices (total variation, W1; reference: real half vs real half),
the teacher's mean confidence on real vs synthetic slices, the share of synthetic slices in which
the teacher finds a target structure (real reference alongside), the teacher-vs-condition Dice
(mask mode), kept/dropped counts, and the path of each PNG grid.

Usage (from the repository root, about 10 minutes on 2 CPU cores with the defaults)::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_synthesis.py --out bench/synthesis

Use ``--datasets ct`` or ``--modes mask`` to run a part; ``--train-steps``/``--num-images``
override the ``fast`` preset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from TSKDLib.data.case import load_2d_cases, load_case, prepare_slices  # noqa: E402
from TSKDLib.pipeline.progress import ProgressReporter  # noqa: E402
from TSKDLib.synthesis import (IntensityTeacher, SynthesisConfig, intensity_histogram_distance,  # noqa: E402
                               label_images, run_synthesis)

DATA = ROOT / "Testing" / "Data"


def load(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "ct":
            case = load_case(DATA / "totalseg" / "ct_dicom", DATA / "totalseg" / "example_seg_dicom.nii.gz",
                             DATA / "totalseg" / "label_map_total_ct.json",
                             classes=["liver", "spleen", "kidney_right", "kidney_left"])
            return prepare_slices([case], 256)
        cases = load_2d_cases(DATA / "hc18" / "images", DATA / "hc18" / "masks", DATA / "hc18" / "labels.json")
        return prepare_slices(cases, 256)


def teacher_for(name: str, slices, out: Path, quiet: bool, steps: int | None = None):
    from TSKDLib.teacher import TeacherConfig, build_teacher, finetune_teacher, load_teacher, save_teacher
    tdir = out / f"teacher-{name}"
    if (tdir / "teacher.json").exists() or any(tdir.glob("*.json")):
        try:
            return load_teacher(tdir), 0.0
        except Exception:
            pass
    cfg = TeacherConfig.preset("fast", device="cpu", **({"steps": steps} if steps else {}))
    t0 = time.monotonic()
    teacher = build_teacher(slices.class_map.names, cfg)
    teacher, history = finetune_teacher(teacher, slices, cfg, ProgressReporter(quiet=quiet), work_dir=tdir / "work")
    save_teacher(teacher, tdir, cfg, history)
    return teacher, time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/synthesis")
    ap.add_argument("--datasets", default="ct,hc18")
    ap.add_argument("--modes", default="mask,none")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--num-images", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a shared CPU)")
    ap.add_argument("--teacher", default="litemedsam", choices=["litemedsam", "intensity"],
                    help="litemedsam: the real fine-tuned teacher (fast preset); intensity: the non-learned "
                         "IntensityTeacher stand-in (quick runs on a busy CPU; not a segmentation model)")
    ap.add_argument("--teacher-steps", type=int, default=None, help="override the teacher's fine-tuning steps")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from TSKDLib.engine.runtime import tune_allocator
    tune_allocator()  # as tskd train does (TSKDLib/engine/runtime.py)
    overrides = {"device": "cpu", "num_threads": args.threads}
    if args.train_steps is not None:
        overrides["steps"] = args.train_steps
    if args.num_images is not None:
        overrides["num_images"] = args.num_images
    rows = []
    for ds in args.datasets.split(","):
        slices = load(ds)
        if args.teacher == "intensity":
            proba, t_teacher = IntensityTeacher(slices), 0.0
        else:
            teacher, t_teacher = teacher_for(ds, slices, out, not args.verbose, args.teacher_steps)
            proba = teacher.predict_proba
        K = slices.class_map.num_classes
        _, real_stats = label_images(slices.images, proba, K, 8)
        real_fg = float((real_stats["foreground_fraction"] > 0.002).float().mean())
        ref = intensity_histogram_distance(slices.images[::2], slices.images[1::2])
        print(f"\n[{ds}] {len(slices)} real slices, K={K}; teacher {args.teacher}, fine-tune {t_teacher:.0f} s; "
              f"real-vs-real histogram TV {ref['tv']:.3f} W1 {ref['w1']:.4f}; teacher confidence on real "
              f"{float(real_stats['confidence'].mean()):.3f}; real slices with a structure {real_fg:.2f}",
              flush=True)
        for mode in args.modes.split(","):
            cfg = SynthesisConfig.preset("fast", conditioning=mode, **overrides)
            t0 = time.monotonic()
            ts = run_synthesis(slices, proba, out / f"{ds}-{mode}", cfg, ProgressReporter(quiet=not args.verbose))
            wall = time.monotonic() - t0
            m = ts.manifest["metrics"]
            every = ts.manifest["items"] + ts.manifest["dropped"]
            syn_fg = sum(i["foreground_fraction"] > 0.002 for i in every) / max(1, len(every))
            row = {"dataset": ds, "mode": mode, "wall_s": round(wall, 1), **m,
                   "synthetic_with_structure": round(syn_fg, 3), "real_with_structure": round(real_fg, 3),
                   "real_vs_real_tv": round(ref["tv"], 4), "grid": str(out / f"{ds}-{mode}" / "grid.png")}
            rows.append(row)
            print(f"  {mode:5s}: train {m['train_seconds']:.0f} s ({cfg.steps} steps, final loss "
                  f"{m['final_loss']:.4f}), sampling {m['sample_seconds_per_image']} s/img "
                  f"({cfg.sampler} {cfg.sample_steps} steps, {cfg.resolution} px), labelling "
                  f"{m['label_seconds_per_image']} s/img, stage wall {wall:.0f} s", flush=True)
            print(f"         histogram TV {m['histogram_tv']:.3f} W1 {m['histogram_w1']:.4f}; teacher confidence "
                  f"real {m['mean_confidence_real']:.3f} synthetic {m['mean_confidence_synthetic']:.3f}; "
                  f"with a structure {syn_fg:.2f} (real {real_fg:.2f}); condition Dice "
                  f"{m['condition_dice'] if m['condition_dice'] is None else round(m['condition_dice'], 3)}; "
                  f"kept {m['kept']}/{m['generated']} (threshold {m['min_confidence']:.3f})", flush=True)
            print(f"         grid: {row['grid']}", flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
