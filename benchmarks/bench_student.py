"""Benchmark of the students (issue 5): size, speed against the teacher, whole-scan inference,
and Dice of TS-KD against its baselines at equal budget.

Usage (from the repository root, ~10-15 min on 2 CPU cores)::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_student.py --part all --out bench/student

Parts
-----
``size``      parameters and FLOPs per 256 x 256 slice of every student and of the teacher.
``speed``     ms per slice, same CPU, same slices (bundled CT at S = 256), batch 8, best of 3:
              teacher (LiteMedSAM, PyTorch) vs each student (PyTorch and onnxruntime).
``e2e``       a 512 x 512 x 100 CT (the bundled 20-slice DICOM series stacked 5 times, written as
              NIfTI) segmented end to end by ``TSKDLib.deploy.inference.segment_file`` in a fresh
              process (read, infer, 3D clean-up, write ``.seg.nrrd``); wall time (without
              interpreter start-up and imports, and with them) and peak resident memory.
``accuracy``  Dice of: student from scratch, task-agnostic KD (features of the pre-trained
              LiteMedSAM encoder), TS-KD without synthesis, full TS-KD (only with
              ``--synthetic FILE.npy`` of ``(M,1,S,S)`` slices), and the teacher. HC18: 20
              labelled subjects, 20 other subjects unlabelled in the transfer set, 30 further
              subjects for testing (split by subject number NNN), per-image Dice. CT: the bundled
              DICOM series with 4 labelled slices; Dice pooled over the 16 other slices (liver,
              spleen; kidneys are absent from these slices). Same student, steps, batch, schedule
              and augmentation for every method. The teacher is fine-tuned with the ``fast``
              preset (LoRA on the decoder, frozen encoder), so its embedding equals the
              pre-trained one: there task-agnostic and task-specific KD differ by the output
              distillation only.

Threads: 1 torch / onnxruntime thread by default for training (``--threads``); on a CPU shared
with other jobs this avoids oversubscription. Speed figures use ``--speed-threads`` (2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "Testing" / "Data"
TOTALSEG = DATA / "totalseg"
HC18_FULL = Path(os.environ.get("TSKD_HC18", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hc18"))
ARCHS = ("unet-s", "unet", "unet-l", "vit_tiny")


def log(*a):
    print(*a, flush=True)


def best_of(fn, n=3):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


# ------------------------------------------------------------------------------------------------
def ct_case(classes=("liver", "spleen")):
    from TSKDLib.data.case import load_case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_case(TOTALSEG / "ct_dicom", TOTALSEG / "example_seg_dicom.nii.gz",
                         TOTALSEG / "label_map_total_ct.json", classes=list(classes))


def part_size_speed(args, results):
    import torch
    from TSKDLib.data.case import prepare_slices
    from TSKDLib.deploy.export import export_model_package
    from TSKDLib.deploy.inference import load_model_package
    from TSKDLib.distillation.student import build_student, count_flops
    from TSKDLib.teacher.backbones import load_foundation_model
    from TSKDLib.teacher.model import TaskAgnosticTeacher
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.speed_threads)
    case = ct_case()
    slices = prepare_slices([case], 256)
    x = slices.images[:8]
    teacher = TaskAgnosticTeacher(load_foundation_model("litemedsam"))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        teacher(x[:1])
    t_params = sum(p.numel() for p in teacher.parameters())
    with torch.inference_mode():
        teacher(x[:2])
        t_ms = best_of(lambda: teacher(x), args.repeats) / len(x) * 1000
    rows = [{"model": "teacher LiteMedSAM (torch)", "params": t_params, "gflops": counter.get_total_flops() / 1e9,
             "ms_per_slice": t_ms}]
    log(f"teacher: {t_params / 1e6:.2f} M params, {rows[0]['gflops']:.1f} GFLOPs/slice, {t_ms:.1f} ms/slice")
    tmp = Path(tempfile.mkdtemp(prefix="bench_student_"))
    for arch in ARCHS:
        m = build_student(arch, num_classes=2, input_size=256).eval()
        flops = count_flops(m, 256)
        with torch.inference_mode():
            m(x[:2])
            ms_torch = best_of(lambda: m(x), args.repeats) / len(x) * 1000
        pkg_dir = export_model_package(m, tmp / arch, case.class_map, {"kind": "window", "width": 400.0, "level": 40.0},
                                       torchscript=False)
        pkg = load_model_package(pkg_dir, providers=["CPUExecutionProvider"], threads=args.speed_threads)
        xn = x.numpy()
        pkg.predict_logits(xn[:2])
        ms_ort = best_of(lambda: pkg.predict_logits(xn), args.repeats) / len(x) * 1000
        row = {"model": f"student {arch}", "params": m.num_parameters(), "gflops": flops / 1e9,
               "ms_per_slice_torch": ms_torch, "ms_per_slice": ms_ort, "speedup_vs_teacher": t_ms / ms_ort}
        rows.append(row)
        log(f"{arch}: {row['params'] / 1e6:.3f} M params, {row['gflops']:.2f} GFLOPs/slice, torch {ms_torch:.1f} ms, "
            f"onnxruntime {ms_ort:.1f} ms/slice, {row['speedup_vs_teacher']:.0f}x faster than the teacher")
    results["size_speed"] = {"threads": args.speed_threads, "batch": len(x), "rows": rows}


# ------------------------------------------------------------------------------------------------
E2E_CHILD = r"""
import json, resource, sys, time
t_start = time.perf_counter()
import TSKDLib.deploy.inference as inf
t_imp = time.perf_counter()
timings = {}
inf.segment_file(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True, cleanup=inf.Cleanup.segment_default(),
                 timings=timings)
t_end = time.perf_counter()
print(json.dumps({"seconds": t_end - t_imp, "seconds_with_imports": t_end - t_start, "timings": timings,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch_imported": "torch" in sys.modules}))
"""


def part_e2e(args, results):
    import SimpleITK as sitk
    import torch
    from TSKDLib.data.case import prepare_slices
    from TSKDLib.distillation.distill import DistillConfig, TransferSet, distill
    from TSKDLib.deploy.export import export_model_package
    from TSKDLib.data.io import read_image

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    img, _ = read_image(TOTALSEG / "ct_dicom")
    arr = sitk.GetArrayFromImage(img)
    big = sitk.GetImageFromArray(np.concatenate([arr] * 5).astype(np.int16))
    big.SetSpacing(img.GetSpacing())
    big.SetOrigin(img.GetOrigin())
    big.SetDirection(img.GetDirection())
    ct_path = tmp / "ct_512x512x100.nii.gz"
    sitk.WriteImage(big, str(ct_path), useCompression=True)
    case = ct_case()
    rows = []
    models = [(Path(m).name, Path(m)) for m in args.e2e_model] if args.e2e_model else [(a, None) for a in args.e2e_archs]
    for arch, pkg in models:
        if pkg is None:  # a quickly trained student: its noisy borders make the regrid slower than a real model's
            slices = prepare_slices([case], 256)
            r = distill(TransferSet.build(slices.labelled_subset()),
                        DistillConfig(method="scratch", steps=30, finetune_steps=0, batch_size=2), None, arch)
            pkg = export_model_package(r.model, tmp / f"pkg_{arch}", case.class_map,
                                       {"kind": "window", "width": 400.0, "level": 40.0, "low": 0.5, "high": 99.5},
                                       torchscript=False)
        runs = []
        for _ in range(args.e2e_repeats):
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.speed_threads)}
            out = subprocess.run([sys.executable, "-c", E2E_CHILD, str(pkg), str(ct_path), str(tmp / "out.seg.nrrd")],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["seconds"])
        best["arch"] = arch
        best["all_seconds"] = sorted(round(r["seconds"], 2) for r in runs)
        rows.append(best)
        t = best["timings"]
        log(f"e2e 512x512x100 CT, {arch}: {best['seconds']:.2f} s (read {t['read']:.2f}, infer {t['infer']:.2f}, "
            f"clean-up+regrid {t['cleanup']:.2f}, write {t['write']:.2f}); with imports "
            f"{best['seconds_with_imports']:.2f} s; peak RSS {best['peak_rss_mb']:.0f} MB; torch imported: "
            f"{best['torch_imported']}; all runs {best['all_seconds']} s")
    results["e2e"] = rows


# ------------------------------------------------------------------------------------------------
def _fine_tune_teacher(slices_labelled, names, steps, threads):
    from TSKDLib.teacher.training import TeacherConfig, build_teacher, finetune_teacher
    cfg = TeacherConfig.preset("fast", steps=steps, device="cpu", val_fraction=0.0)
    teacher = build_teacher(names, cfg)
    teacher, hist = finetune_teacher(teacher, slices_labelled, cfg)
    return teacher.eval()


def _run_methods(name, transfer, cache_ts, cache_ta, base, arch, test, per_slice, num_classes, synthetic_transfer=None,
                 cache_syn=None):
    from TSKDLib.distillation.distill import distill, evaluate_dice, method_config
    out = {}
    plan = [("scratch", transfer, None), ("task_agnostic_kd", transfer, cache_ta), ("tskd_no_synthesis", transfer, cache_ts)]
    if synthetic_transfer is not None:
        plan.append(("tskd_full", synthetic_transfer, cache_syn))
    for label, tr, cache in plan:
        method = {"scratch": "scratch", "task_agnostic_kd": "task_agnostic"}.get(label, "tskd")
        t0 = time.time()
        r = distill(tr, method_config(method, base), cache, arch)
        d = evaluate_dice(r.model, *test, per_slice=per_slice, num_classes=num_classes)
        out[label] = {"dice": d["mean"], "per_class": d["per_class"], "seconds": round(time.time() - t0, 1)}
        log(f"{name} {label}: Dice {d['mean']:.3f} {[round(v, 3) for v in d['per_class']]} ({out[label]['seconds']} s)")
    return out


def part_accuracy(args, results):
    import torch
    from TSKDLib.data.case import load_2d_cases, prepare_slices
    from TSKDLib.distillation.distill import DistillConfig, TransferSet, build_teacher_cache, dice_scores

    torch.set_num_threads(args.threads)
    S = args.size
    base = DistillConfig(steps=args.steps, finetune_steps=args.finetune_steps, batch_size=args.batch, seed=0,
                         log_every=50)
    acc = {"size": S, "config": base.to_dict(), "arch": args.arch}
    synthetic = np.load(args.synthetic) if args.synthetic else None

    # --- HC18 -------------------------------------------------------------------------------------
    if "hc18" in args.datasets:
        from TSKDLib.data.io import find_2d_pairs
        pairs = find_2d_pairs(HC18_FULL / "images", HC18_FULL / "masks")
        subjects = sorted({p.subject for p in pairs})
        rng = np.random.RandomState(0)
        order = list(rng.permutation(subjects))
        lab_s, unl_s, test_s = set(order[:20]), set(order[20:40]), set(order[40:70])

        def pick(sub, one=True):
            names, seen = [], set()
            for p in pairs:
                if p.subject in sub and (not one or p.subject not in seen):
                    names.append(p.image.stem)
                    seen.add(p.subject)
            return names
        load = lambda names: load_2d_cases(HC18_FULL / "images", HC18_FULL / "masks", HC18_FULL / "labels.json",
                                           names=names)
        lab = prepare_slices(load(pick(lab_s)), S)
        unl = prepare_slices(load(pick(unl_s)), S)
        unl.labels[:] = -1
        unl.labelled[:] = False
        test = prepare_slices(load(pick(test_s)), S)
        log(f"HC18: {len(lab)} labelled, {len(unl)} unlabelled, {len(test)} test images (one per subject)")
        from TSKDLib.data.case import SliceSet
        joined = SliceSet(torch.cat([lab.images, unl.images]), torch.cat([lab.labels, unl.labels]),
                          torch.cat([lab.valid, unl.valid]), torch.cat([lab.labelled, unl.labelled]),
                          torch.cat([lab.case_index, unl.case_index]), torch.cat([lab.slice_index, unl.slice_index]),
                          lab.class_map, lab.case_names, lab.subjects)
        transfer = TransferSet.build(joined)
        t0 = time.time()
        teacher = _fine_tune_teacher(lab, lab.class_map.names, args.teacher_steps, args.threads)
        log(f"HC18 teacher fine-tuned in {time.time() - t0:.0f} s")
        t0 = time.time()
        cache_ts = build_teacher_cache(teacher, transfer.images, batch_size=4)
        from TSKDLib.teacher.backbones import load_foundation_model
        from TSKDLib.teacher.model import TaskAgnosticTeacher
        agnostic = TaskAgnosticTeacher(load_foundation_model("litemedsam"))
        cache_ta = build_teacher_cache(agnostic.embed, transfer.images, batch_size=4, with_probs=False)
        with torch.inference_mode():
            t_pred = teacher.predict_labelmap(test.images, batch_size=4)
        log(f"HC18 teacher caches + test predictions in {time.time() - t0:.0f} s")
        td = dice_scores(t_pred, test.labels, 1, per_slice=True)
        res = _run_methods("HC18", transfer, cache_ts, cache_ta, base, args.arch, (test.images, test.labels), True, 1)
        res["teacher"] = {"dice": td["mean"], "per_class": td["per_class"]}
        log(f"HC18 teacher: Dice {td['mean']:.3f}")
        acc["hc18"] = res
        del cache_ts, cache_ta, teacher, agnostic

    # --- CT, 4 labelled slices ----------------------------------------------------------------------
    if "ct" in args.datasets:
        case = ct_case()
        full = prepare_slices([case], S)
        keep = [2, 7, 12, 17]
        train = full.subset(torch.arange(len(full)))
        train.labels = full.labels.clone()
        flags = torch.zeros(len(full), dtype=torch.bool)
        flags[keep] = True
        train.labels[~flags] = -1
        train.labelled = flags
        transfer = TransferSet.build(train)
        t0 = time.time()
        teacher = _fine_tune_teacher(train.labelled_subset(), full.class_map.names, args.teacher_steps, args.threads)
        log(f"CT teacher fine-tuned in {time.time() - t0:.0f} s")
        cache_ts = build_teacher_cache(teacher, transfer.images, batch_size=4)
        from TSKDLib.teacher.backbones import load_foundation_model
        from TSKDLib.teacher.model import TaskAgnosticTeacher
        agnostic = TaskAgnosticTeacher(load_foundation_model("litemedsam"))
        cache_ta = build_teacher_cache(agnostic.embed, transfer.images, batch_size=4, with_probs=False)
        test_idx = torch.tensor([i for i in range(len(full)) if i not in keep])
        test = (full.images[test_idx], full.labels[test_idx])
        t_pred = torch.from_numpy(np.asarray(cache_ts.probs)).float().argmax(1)[test_idx]
        td = dice_scores(t_pred, test[1], 2)
        res = _run_methods("CT", transfer, cache_ts, cache_ta, base, args.arch, test, False, 2)
        res["teacher"] = {"dice": td["mean"], "per_class": td["per_class"]}
        log(f"CT teacher: Dice {td['mean']:.3f} {[round(v, 3) for v in td['per_class']]}")
        acc["ct"] = res
    if synthetic is None:
        acc["note"] = "full TS-KD (with synthetic slices) not run: pass --synthetic FILE.npy"
    results["accuracy"] = acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="all", choices=["all", "size", "speed", "e2e", "accuracy"])
    ap.add_argument("--out", default="bench/student")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arch", default="unet", help="student of the accuracy part")
    ap.add_argument("--e2e-archs", nargs="+", default=["unet-s", "unet"])
    ap.add_argument("--e2e-model", nargs="+", default=None,
                    help="e2e: time these trained model packages (e.g. runs/demo/run/model) instead")
    ap.add_argument("--e2e-repeats", type=int, default=2, help="e2e: runs per model (the fastest is reported)")
    ap.add_argument("--size", type=int, default=128, help="model size S of the accuracy part")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--teacher-steps", type=int, default=60)
    ap.add_argument("--datasets", nargs="+", default=["hc18", "ct"])
    ap.add_argument("--synthetic", default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    results = {}
    t0 = time.time()
    if args.part in ("all", "size", "speed"):
        part_size_speed(args, results)
    if args.part in ("all", "e2e"):
        part_e2e(args, results)
    if args.part in ("all", "accuracy"):
        part_accuracy(args, results)
    results["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_student_{args.part}.json").write_text(json.dumps(results, indent=1, default=str))
    log(f"results: {out / f'bench_student_{args.part}.json'} ({results['seconds']} s)")


if __name__ == "__main__":
    main()
