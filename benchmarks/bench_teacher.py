"""Benchmark of the TS-KD teacher (issue 3): accuracy of the fine-tuned vs task-agnostic teacher,
and CPU speed/memory. Prints figures; not a test.

* HC18 (``../shared/data/hc18`` beside the checkout): fine-tune on ``--n-train`` images from as many subjects,
  evaluate on ``--n-test`` images of *other* subjects (split by subject number NNN). Dice and
  HD95 (MONAI) for the fine-tuned teacher and for task-agnostic LiteMedSAM with the full-image
  box. HD95 is reported in mm (HC18 pixel sizes, scaled to the 256 model grid).
* DICOM CT (``Testing/Data/totalseg``): fine-tune on ``--ct-train`` labelled slices of liver,
  spleen and both kidneys; per-class Dice on the other slices.
* Speed: encoder pass before/after conv-BN fusion + channels_last, training step of the paper
  setting (encoder + decoder LoRA) vs the fast setting (cached embeddings, decoder LoRA) with
  and without LoRA dropout, inference seconds per slice, and peak memory (ru_maxrss).

HD95 follows MONAI's definition but is computed here in torch: MONAI's implementation needs
scipy, which is not installed in the project environment.

Example (about 10-15 min on 2 CPU cores)::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_teacher.py --steps 60 --ct-steps 30
"""

from __future__ import annotations

import argparse
import csv
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch

from TSKDLib.data.case import load_2d_cases, load_case, prepare_slices
from TSKDLib.data.io import find_2d_pairs
from TSKDLib.pipeline.progress import ProgressReporter
from TSKDLib.teacher import (TaskAgnosticTeacher, TeacherConfig, build_teacher, finetune_teacher, labelmap,
                             load_foundation_model)
from TSKDLib.teacher.training import MaskedDiceCELoss

ROOT = Path(__file__).resolve().parents[1]
CT_CLASSES = ["liver", "spleen", "kidney_right", "kidney_left"]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@torch.inference_mode()
def embed_all(backbone, images, batch=4):
    return torch.cat([backbone.encode(images[i:i + batch]) for i in range(0, len(images), batch)])


def _edges(mask: torch.Tensor) -> torch.Tensor:
    """Boundary pixels (mask minus its 3x3 erosion) as (n, 2) coordinates."""
    m = mask.float()[None, None]
    eroded = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)
    return torch.nonzero((m - eroded)[0, 0] > 0).float()


def hd95(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """Symmetric 95th-percentile Hausdorff distance in pixels between two 2D masks, as MONAI's
    ``compute_hausdorff_distance(percentile=95)`` (max of the two directed 95th percentiles of
    boundary-to-boundary distances). MONAI's own needs scipy, which the environment lacks."""
    if not ref.any():
        return float("nan")
    if not pred.any():
        return float("inf")
    a, b = _edges(pred), _edges(ref)
    d = torch.cdist(a, b)
    return max(float(torch.quantile(d.min(1).values, 0.95)), float(torch.quantile(d.min(0).values, 0.95)))


def seg_metrics(pred, ref, valid, k, mm_per_px=None):
    """MONAI Dice and HD95 per slice and class; ``pred``/``ref`` (N, S, S) int64 labelmaps."""
    from monai.metrics import compute_dice

    pred = torch.where(valid, pred, 0)
    ref = torch.where(valid & (ref > 0), ref, 0)
    oh_p = torch.nn.functional.one_hot(pred, k + 1).permute(0, 3, 1, 2)
    oh_r = torch.nn.functional.one_hot(ref, k + 1).permute(0, 3, 1, 2)
    dice = compute_dice(oh_p, oh_r, include_background=False, ignore_empty=True)
    hd = torch.tensor([[hd95(pred[i] == c, ref[i] == c) for c in range(1, k + 1)] for i in range(len(pred))])
    if mm_per_px is not None:
        hd = hd * torch.as_tensor(mm_per_px, dtype=hd.dtype)[:, None]
    return dice, hd


def nanmean(x):
    x = x[~torch.isnan(x) & ~torch.isinf(x)]
    return float(x.mean()) if x.numel() else float("nan")


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


def bench_hc18(args, results):
    root = Path(args.hc18)
    pairs = [p for p in find_2d_pairs(root / "images", root / "masks") if p.mask is not None]
    subjects = sorted({p.subject for p in pairs})
    rng = random.Random(args.seed)
    rng.shuffle(subjects)
    train_subjects = set(subjects[:args.n_train])
    train_names = [next(p for p in pairs if p.subject == s).image.stem for s in sorted(train_subjects)]
    test_pool = [p for p in pairs if p.subject not in train_subjects]
    rng.shuffle(test_pool)
    test_names = [p.image.stem for p in test_pool[:args.n_test]]
    assert not {p.subject for p in test_pool[:args.n_test]} & train_subjects
    pixel_mm = {}
    with open(next(root.glob("*.csv"))) as fh:
        for row in csv.DictReader(fh):
            pixel_mm[Path(row["filename"]).stem] = float(row["pixel size(mm)"])

    t = time.perf_counter()
    cases = {c.name: c for c in load_2d_cases(root / "images", root / "masks", root / "labels.json",
                                              names=train_names + test_names)}
    train = prepare_slices([cases[n] for n in train_names], args.size)
    test = prepare_slices([cases[n] for n in test_names], args.size)
    # mm per model pixel: long side (800 px) -> S
    scale = [max(cases[n].image_slices().shape[1:]) / args.size for n in test_names]
    mm = [pixel_mm[n] * s for n, s in zip(test_names, scale)]
    print(f"HC18: {len(train_names)} training images ({len(train_subjects)} subjects), {len(test_names)} test "
          f"images of {len({p.subject for p in test_pool[:args.n_test]})} other subjects; loaded in "
          f"{time.perf_counter() - t:.1f}s")

    agnostic = TaskAgnosticTeacher(load_foundation_model("litemedsam"))
    t = time.perf_counter()
    test_emb = embed_all(agnostic.backbone, test.images)
    enc_s = (time.perf_counter() - t) / len(test_names)
    with torch.inference_mode():
        tokens = agnostic.backbone.box_tokens(agnostic.backbone.full_box())
        ag_pred = labelmap(torch.cat([agnostic.backbone.decode(test_emb[i:i + 8], tokens)
                                      for i in range(0, len(test_emb), 8)]))
    ag_dice, ag_hd = seg_metrics(ag_pred, test.labels, test.valid, 1, mm)

    config = TeacherConfig.preset("fast", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  val_every=max(args.steps // 6, 1), seed=args.seed, device="cpu")
    teacher = build_teacher(train.class_map.names, config)
    t = time.perf_counter()
    teacher, history = finetune_teacher(teacher, train, config, ProgressReporter(quiet=not args.bars))
    train_s = time.perf_counter() - t
    with torch.inference_mode():
        t = time.perf_counter()
        ts_pred = labelmap(torch.cat([teacher.decode(test_emb[i:i + 8], args.size)
                                      for i in range(0, len(test_emb), 8)]))
        dec_s = (time.perf_counter() - t) / len(test_names)
    ts_dice, ts_hd = seg_metrics(ts_pred, test.labels, test.valid, 1, mm)
    print(f"  task-agnostic LiteMedSAM (full-image box): Dice {nanmean(ag_dice):.3f} "
          f"(median {float(ag_dice.nanmedian()):.3f}), HD95 {nanmean(ag_hd):.1f} mm")
    print(f"  task-specific teacher (fast preset, {history['steps_run']} steps x {args.batch_size}, best val "
          f"Dice {history['best_val_dice']:.3f} at step {history['best_step']}): Dice {nanmean(ts_dice):.3f} "
          f"(median {float(ts_dice.nanmedian()):.3f}), HD95 {nanmean(ts_hd):.1f} mm")
    print(f"  Dice gain {nanmean(ts_dice) - nanmean(ag_dice):+.3f}; training {train_s:.0f}s incl. encoding "
          f"{len(history['train_indices']) + len(history['val_indices'])} slices; "
          f"{history['seconds_per_step']:.2f} s/step (batch {args.batch_size}, cached embeddings); "
          f"encoder {enc_s:.2f} s/slice, decoder {dec_s:.3f} s/slice")
    results["hc18"] = dict(agnostic_dice=nanmean(ag_dice), teacher_dice=nanmean(ts_dice),
                           agnostic_hd95=nanmean(ag_hd), teacher_hd95=nanmean(ts_hd))
    return teacher, test


def bench_ct(args, results):
    data = ROOT / "Testing" / "Data" / "totalseg"
    t = time.perf_counter()
    case = load_case(data / "ct_dicom", data / "example_seg_dicom.nii.gz", data / "label_map_total_ct.json",
                     classes=CT_CLASSES)
    slices = prepare_slices([case], args.size)
    labelled = torch.nonzero(slices.labelled).flatten().tolist()
    pick = [labelled[int(round(q * (len(labelled) - 1)))] for q in np.linspace(0.15, 0.85, args.ct_train)]
    train = slices.subset(pick)
    rest = slices.subset([i for i in labelled if i not in pick])
    names = slices.class_map.names
    print(f"CT DICOM: {len(slices)} slices, classes {names}; training on slices {pick}, evaluating on "
          f"{len(rest)} others; loaded in {time.perf_counter() - t:.1f}s")
    config = TeacherConfig.preset("fast", steps=args.ct_steps, batch_size=args.ct_batch_size, lr=args.lr,
                                  val_fraction=0.0, seed=args.seed, device="cpu")
    teacher = build_teacher(names, config)
    with torch.inference_mode():
        rest_emb = embed_all(teacher.backbone, rest.images)
        before = labelmap(teacher.decode(rest_emb, args.size))
    teacher, history = finetune_teacher(teacher, train, config, ProgressReporter(quiet=not args.bars))
    with torch.inference_mode():
        after = labelmap(torch.cat([teacher.decode(rest_emb[i:i + 4], args.size) for i in range(0, len(rest), 4)]))
    d0, _ = seg_metrics(before, rest.labels, rest.valid, len(names))
    d1, _ = seg_metrics(after, rest.labels, rest.valid, len(names))
    per0 = {n: nanmean(d0[:, i]) for i, n in enumerate(names)}
    per1 = {n: nanmean(d1[:, i]) for i, n in enumerate(names)}
    print("  per-class Dice, untrained prompts -> fine-tuned: "
          + ", ".join(f"{n} {per0[n]:.3f} -> {per1[n]:.3f}" for n in names))
    print(f"  mean {np.nanmean(list(per0.values())):.3f} -> {np.nanmean(list(per1.values())):.3f}; "
          f"{history['steps_run']} steps x {args.ct_batch_size} slices x {len(names)} classes, "
          f"{history['seconds_per_step']:.2f} s/step")
    absent = [i for i, n in enumerate(names) if not bool((rest.labels == i + 1).any())]
    if absent:
        print("  absent from the reference on these slices (Dice undefined); predicted pixels (false "
              "positives) untrained -> fine-tuned: " + ", ".join(
                  f"{names[i]} {int((before == i + 1).sum())} -> {int((after == i + 1).sum())}" for i in absent))
    results["ct"] = per1


def bench_speed(args, teacher, test):
    images = test.images[:4]
    loss_fn = MaskedDiceCELoss()
    print(f"Speed (CPU, {torch.get_num_threads()} threads; min of {args.reps} runs):")
    before = load_foundation_model("litemedsam", fuse=False)
    after = load_foundation_model("litemedsam")
    with torch.inference_mode():
        plain = lambda: before.image_encoder(before.prepare_images(images).contiguous())  # noqa: E731
        fast = lambda: after.encode(images)  # noqa: E731
        b, _ = timed(plain, args.reps)
        a, _ = timed(fast, args.reps)
    print(f"  encoder inference: {b / 4:.2f} s/slice before (unfused BN, contiguous) -> {a / 4:.2f} s/slice "
          f"after (conv-BN fused, channels_last)")
    del before, after

    with torch.inference_mode():
        t, _ = timed(lambda: teacher.predict(images, batch_size=4), args.reps)
    print(f"  fine-tuned teacher inference (encoder + decoder, batch 4): {t / 4:.2f} s/slice")

    labels, valid = test.labels[:2], test.valid[:2]
    imgs2 = test.images[:2]
    for name, cfg in [("paper (encoder+decoder LoRA, full backprop)", TeacherConfig(device="cpu")),
                      ("fast, LoRA dropout 0.05 (before)", TeacherConfig.preset("fast", lora_dropout=0.05)),
                      ("fast, no LoRA dropout (after)", TeacherConfig.preset("fast"))]:
        tch = build_teacher(["fetal_head"], cfg).train()
        opt = torch.optim.AdamW([p for p in tch.parameters() if p.requires_grad], lr=1e-4)
        with torch.no_grad():
            emb = tch.embed(imgs2)

        def step():
            logits = tch.decode(emb, args.size) if not tch.adapts_encoder else tch(imgs2).logits
            loss = loss_fn(logits, labels, valid)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        s, _ = timed(step, args.reps)
        print(f"  training step, batch 2, {name}: {s:.2f} s/step")
        del tch, opt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hc18", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hc18"))
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ct-train", type=int, default=4)
    parser.add_argument("--ct-steps", type=int, default=30)
    parser.add_argument("--ct-batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["hc18", "ct", "speed"])
    parser.add_argument("--bars", action="store_true", help="show progress bars on stderr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from TSKDLib.engine.runtime import tune_allocator
    tune_allocator()  # as tskd train does (TSKDLib/engine/runtime.py)
    t0 = time.perf_counter()
    results: dict = {}
    teacher = test = None
    if "hc18" not in args.skip:
        teacher, test = bench_hc18(args, results)
    if "ct" not in args.skip:
        bench_ct(args, results)
    if "speed" not in args.skip and teacher is not None:
        bench_speed(args, teacher, test)
    print(f"Peak memory (ru_maxrss): {peak_mb():.0f} MB; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
