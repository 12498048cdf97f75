"""Issue 15: the one-object classes' location rule of ``tskd segment``'s clean-up, run by run.

    python benchmarks/location_rule.py run --groups 0,1,2 2,3,4 0,1,4 --seeds 0 1 2 \
        [--data ../shared/data/chaos_mr_t2_dev] [--work-dir bench/work_noval] [--distillation JSON] \
        --out bench/location
    python benchmarks/location_rule.py score bench/location [--margins 40 60 80]
    python benchmarks/location_rule.py ensemble bench/location 012_s0 012_s1 012_s2

``run`` trains, per (training scans, seed), the sparse-slice benchmark's TS-KD student (3
labelled slices per organ, ``fast`` preset, teacher with ``val_fraction 0`` as ``tskd train``'s
refit; teachers and their outputs kept in ``--work-dir``) and keeps its softmax on every dev scan
at the native grid (``proba_<scan>.npy``, float16, ``(N, K+1, H, W)``), with the one-object
classes, the training scans and their intensity factors (``run.json``) and the student itself
(``student.pt``) in ``--out/<groups>_s<seed>/``. The students learn the training scans
intensity-standardised, as ``tskd train``'s do (``--distillation '{"standardize": false}'``: as
prepared, the thirteenth and fourteenth passes).

``score`` cleans each kept prediction as ``tskd segment`` does, without and with the location
rule (:class:`TSKDLib.deploy.inference.Cleanup`, ``locations``: where each one-object class's
labelled voxels lay in the training scans, as ``tskd train`` records it), and prints per run the
Dice of each organ on the new scans (``other``) and on the training scans' unlabelled slices
(``within``), then per region the mean of each setting, the paired difference with its standard
error and the runs with no organ below 0.70. Results: benchmarks/RESULTS.md, section 6, twelfth
pass.

``ensemble`` scores, on the new scans, each of several runs trained on the same scans and the
mean of their softmax, with the clean-up and location rule (section 6, fourteenth pass).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
from chaos import DEFAULT_DIR, SCANS, load_scan

from TSKDLib.deploy.inference import (
    LOCATION_MARGIN_MM,
    Cleanup,
    class_locations_lps,
    cleanup_labels,
    mean_class_locations,
)

ORGAN_FLOOR = 0.70


def run(args) -> None:
    import torch

    import TSKDLib.distillation.distill as distill_module
    import TSKDLib.evaluation.sparse_benchmark as sparse
    from TSKDLib.data.case import prepare_case_slices

    torch.set_num_threads(args.threads)
    scans = [load_scan(args.data, s) for s in SCANS]
    plain_distill, plain_set_post = distill_module.distill, sparse._Scorer.set_post
    kept: dict = {}  # what the run in progress trained: its student and one-object classes

    def keep_model(*a, **kw):
        res = plain_distill(*a, **kw)
        kept["model"] = res.model
        return res

    def keep_classes(scorer, classes):
        kept["one_object"] = [int(k) for k in classes]
        return plain_set_post(scorer, classes)

    for seed in args.seeds:
        for group in args.groups:
            idx = [int(i) for i in group.split(",")]
            out = Path(args.out) / f"{group.replace(',', '')}_s{seed}"
            if (out / "run.json").exists():
                continue
            kept.clear()
            distill_module.distill, sparse._Scorer.set_post = keep_model, keep_classes
            try:
                cfg = sparse.SparseConfig(seeds=[seed], train_groups=[idx], preset="fast", methods=["tskd_nosyn"],
                                          work_dir=args.work_dir, teacher_other=False, other_scans=True,
                                          teacher={"val_fraction": 0.0},
                                          distillation=json.loads(args.distillation))
                sparse.run_sparse_benchmark(scans, cfg, out)
            finally:
                distill_module.distill, sparse._Scorer.set_post = plain_distill, plain_set_post
            model = kept["model"].eval()
            torch.save(model, out / "student.pt")  # for benchmarks/intensity_reference.py
            for case, scan in zip(scans, SCANS):
                images, _, resizer, _ = prepare_case_slices(case, cfg.size)
                probs = []
                with torch.inference_mode():
                    for i in range(0, len(images), 8):
                        p = torch.softmax(model(images[i:i + 8]).float(), 1)
                        probs.append(resizer.from_model(p, "bilinear").half())
                np.save(out / f"proba_{scan}.npy", torch.cat(probs).numpy())
            (out / "run.json").write_text(json.dumps({"train": [SCANS[i] for i in idx], "seed": seed,
                                                      "one_object": kept["one_object"],
                                                      "intensity_factors": _factors(scans, idx, cfg)}))


def _factors(scans: list, idx: list[int], cfg) -> list[float]:
    """The training scans' intensity factors the run's student learnt with (the sparse-slice
    benchmark's, as ``tskd train``'s: :func:`TSKDLib.deploy.inference.training_intensity_factors`
    of the 3 labelled slices per organ; all 1.0 with ``--distillation '{"standardize": false}'``)."""
    import TSKDLib.evaluation.sparse_benchmark as sparse
    from TSKDLib.deploy.inference import training_intensity_factors

    if cfg.distillation.get("standardize") is False:
        return [1.0] * len(idx)
    train = [sparse._with_sparse_labels(scans[i], cfg.per_class)[0] for i in idx]
    return training_intensity_factors(sparse._training_medians(train), scans[0].class_map.names)


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    a, b = int(pred.sum()), int(ref.sum())
    return math.nan if a + b == 0 else 2.0 * int((pred & ref).sum()) / (a + b)


def _references(data: str):
    """Every dev scan, its number of classes and class names, reference labels, labelled slices
    (3 per organ) and frame geometry."""
    from TSKDLib.evaluation.sparse_benchmark import sparse_slice_indices

    cases = {s: load_scan(data, s) for s in SCANS}
    k = cases[SCANS[0]].class_map.num_classes
    refs = {s: cases[s].label_slices() for s in SCANS}
    picks = {s: sparse_slice_indices(refs[s], k, 3) for s in SCANS}
    geometry = {s: cases[s].frame.frame_geometry(cases[s].image) for s in SCANS}
    return cases, k, cases[SCANS[0]].class_map.names, refs, picks, geometry


def ensemble(args) -> None:
    """Per new scan, each run's Dice and that of the mean of their softmax (the runs must share
    their training scans), after the product's clean-up with the location rule (the one-object
    classes common to the runs)."""
    from TSKDLib.evaluation.sparse_benchmark import _spacing

    cases, k, names, refs, picks, geometry = _references(args.data)
    infos = [json.loads((Path(args.folder) / r / "run.json").read_text()) for r in args.runs]
    train = infos[0]["train"]
    if any(i["train"] != train for i in infos):
        raise SystemExit("the runs were trained on different scans")
    single = tuple(sorted(set.intersection(*(set(i["one_object"]) for i in infos))))
    locations = mean_class_locations([class_locations_lps(refs[s], geometry[s], single, picks[s])
                                      for s in train], single)
    options = Cleanup.segment_default(single, locations=locations)
    print(f"trained on {train}, one-object {[names[c - 1] for c in single]}")
    for scan in (s for s in SCANS if s not in train):
        probas = [np.load(Path(args.folder) / r / f"proba_{scan}.npy").astype(np.float32) for r in args.runs]
        for name, proba in [*zip(args.runs, probas), ("mean", sum(probas) / len(probas))]:
            lab = cleanup_labels(proba.argmax(1).astype(np.uint8), k, _spacing(cases[scan]), options, geometry[scan])
            organs = [_dice(lab == c, refs[scan] == c) for c in range(1, k + 1)]
            print(f"  scan {scan} {name:>8}: " + " / ".join(f"{d:.2f}" for d in organs) + f" = {np.nanmean(organs):.3f}")


def score(args) -> None:
    from TSKDLib.evaluation.sparse_benchmark import _spacing

    cases, k, names, refs, picks, geometry = _references(args.data)
    settings = ["size rule"] + [f"+ location {m:g} mm" for m in args.margins]
    # {region: {setting: [(run, mean Dice, lowest organ)]}}
    table: dict = {r: {s: [] for s in settings} for r in ("within", "other")}
    for folder in sorted(p.parent for p in Path(args.folder).glob("*/run.json")):
        info = json.loads((folder / "run.json").read_text())
        train, single = info["train"], tuple(info["one_object"])
        locations = mean_class_locations([class_locations_lps(refs[s], geometry[s], single, picks[s])
                                          for s in train], single)
        options = [Cleanup.segment_default(single)] + [
            Cleanup.segment_default(single, locations=locations, location_margin_mm=m) for m in args.margins]
        print(f"== {folder.name}: trained on {train}, one-object {[names[c - 1] for c in single]}")
        scores: dict = {(r, s): [] for r in table for s in settings}
        for scan in SCANS:
            raw = np.load(folder / f"proba_{scan}.npy").argmax(1).astype(np.uint8)
            region = "within" if scan in train else "other"
            scored = np.ones(len(raw), bool)
            if scan in train:
                scored[picks[scan]] = False
            for setting, opts in zip(settings, options):
                lab = cleanup_labels(raw, k, _spacing(cases[scan]), opts, geometry[scan])
                organs = [_dice(lab[scored] == c, refs[scan][scored] == c) for c in range(1, k + 1)]
                scores[(region, setting)].extend(d for d in organs if not math.isnan(d))
                if region == "other":
                    print(f"  scan {scan} {setting:>20}: " + " / ".join(f"{d:.2f}" for d in organs)
                          + f" = {np.nanmean(organs):.3f}")
        for (region, setting), values in scores.items():
            table[region][setting].append((folder.name, float(np.mean(values)), min(values)))
    for region, rows in table.items():
        base = [m for _, m, _ in rows["size rule"]]
        print(f"== {region}: {len(base)} runs")
        for setting, values in rows.items():
            means = [m for _, m, _ in values]
            diff = [a - b for a, b in zip(means, base)]
            se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
            floor = sum(low >= ORGAN_FLOOR for _, _, low in values)
            print(f"  {setting:>20}: mean {np.mean(means):.3f}, minus size rule {np.mean(diff):+.3f} +- {se:.3f} (SE), "
                  f"runs with no organ below {ORGAN_FLOOR}: {floor} of {len(values)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the students and keep their softmax on every dev scan")
    r.add_argument("--groups", nargs="+", default=["0,1,2", "2,3,4", "0,1,4"],
                   help="training scans as indices into 31, 32, 33, 34, 36")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--work-dir", default="bench/work_noval")
    r.add_argument("--out", default="bench/location")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--distillation", default="{}",
                   help='JSON distillation overrides on the fast preset, e.g. \'{"min_epochs": 0}\'')
    s = sub.add_parser("score", help="Dice without and with the location rule")
    s.add_argument("folder")
    s.add_argument("--margins", type=float, nargs="+", default=[LOCATION_MARGIN_MM])
    e = sub.add_parser("ensemble", help="each run and the mean of their softmax on the new scans")
    e.add_argument("folder")
    e.add_argument("runs", nargs="+", help="run folders in FOLDER trained on the same scans (e.g. 012_s0 012_s1)")
    for p in (r, s, e):
        p.add_argument("--data", default=str(DEFAULT_DIR))
    args = ap.parse_args(argv)
    {"run": run, "score": score, "ensemble": ensemble}[args.command](args)


if __name__ == "__main__":
    main()
