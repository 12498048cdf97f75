"""Issue 15: ``tskd segment``'s intensity standardisation on new scans, run by run.

    python benchmarks/location_rule.py run --groups 0,1,2 2,3,4 0,1,4 --seeds 0 1 2 --out bench/location
    python benchmarks/intensity_reference.py bench/location [--data ../shared/data/chaos_mr_t2_dev]

Each folder of ``location_rule.py run`` holds a sparse-slice TS-KD student (``student.pt``, 3
labelled slices per organ, ``fast`` preset) and its training scans and one-object classes
(``run.json``). This script exports each student as the model package ``tskd train`` would
write (one-object classes and their locations, and the training scans' class intensities:
:func:`TSKDLib.deploy.inference.case_class_intensities` on the labelled slices, after the
run's ``intensity_factors`` when the student learnt the scans standardised), then segments
every dev scan with :func:`TSKDLib.deploy.inference.segment_image` and the card's clean-up,
once without and once with the intensity reference (``normalization.standardize``). It
prints per run the factor and the Dice of each organ on the new scans (``other``) and on the
training scans' unlabelled slices (``within``), then per region the mean of each setting, the
paired difference with its standard error, the runs with no organ below 0.70 and the seed
spread per training group. Results: benchmarks/RESULTS.md, section 6, thirteenth pass.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from chaos import DEFAULT_DIR, SCANS, load_scan, scan_files
from location_rule import ORGAN_FLOOR, _dice


def _export(folder: Path, cases: dict, picks: dict, out: Path):
    """The run's student as ``tskd train``'s package (card entries from the same helpers)."""
    import torch

    from TSKDLib.data.case import with_labelled
    from TSKDLib.data.preprocess import Normalization
    from TSKDLib.deploy.export import export_model_package
    from TSKDLib.deploy.inference import case_class_intensities, load_model_package
    from TSKDLib.pipeline.run import (
        _card_normalization,
        _class_locations,
        _postprocessing,
    )

    info = json.loads((folder / "run.json").read_text())
    model = torch.load(folder / "student.pt", map_location="cpu", weights_only=False)
    norm = Normalization.preset("mr")
    train = []
    for s in info["train"]:
        flags = np.zeros(cases[s].num_slices, bool)
        flags[picks[s]] = True
        c = with_labelled(cases[s], flags)
        train.append({"image": str(c.image_path), "class_locations_mm": _class_locations(c),
                      "class_intensity_medians": case_class_intensities(c, norm)})
    prep = {"cases": train, "normalization": norm.to_dict()}
    class_map = cases[info["train"][0]].class_map
    summary = {"metrics": {"pseudo_labels": {"objects": {str(k): 1 for k in info["one_object"]}}}}
    factors = info.get("intensity_factors")  # absent: a student that learnt the scans as prepared
    export_model_package(model, out, class_map, _card_normalization(prep, factors), input_size=256,
                         slice_axis=cases[info["train"][0]].axis, torchscript=False, overwrite=True,
                         postprocessing=_postprocessing(class_map.names, summary, prep))
    return load_model_package(out), info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="the --out folder of location_rule.py run (one sub-folder per run)")
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    args = ap.parse_args(argv)

    from TSKDLib.deploy.inference import Cleanup, segment_image
    from TSKDLib.evaluation.sparse_benchmark import sparse_slice_indices

    cases = {s: load_scan(args.data, s) for s in SCANS}
    k = cases[SCANS[0]].class_map.num_classes
    refs = {s: cases[s].label_slices() for s in SCANS}
    picks = {s: sparse_slice_indices(refs[s], k, 3) for s in SCANS}
    settings = ("as trained", "standardised")
    table: dict = {r: {s: [] for s in settings} for r in ("within", "other")}  # (run, group, mean, lowest)
    folders = sorted(p.parent for p in Path(args.folder).glob("*/run.json") if (p.parent / "student.pt").exists())
    with tempfile.TemporaryDirectory(prefix="tskd-intensity-") as tmp:
        for folder in folders:
            pkg, info = _export(folder, cases, picks, Path(tmp) / folder.name)
            reference = dict(pkg.normalization["standardize"])
            print(f"== {folder.name}: trained on {info['train']}, reference "
                  + " / ".join(f"{v:.3f}" for v in pkg.intensity_reference.values())
                  + ("" if info.get("intensity_factors") is None else
                     ", training factors " + " / ".join(f"{f:.2f}" for f in info["intensity_factors"])))
            scores: dict = {(r, s): [] for r in table for s in settings}
            for scan in SCANS:
                region = "within" if scan in info["train"] else "other"
                scored = np.ones(len(refs[scan]), bool)
                if scan in info["train"]:
                    scored[picks[scan]] = False
                line = []
                for setting in settings:
                    if setting == "as trained":
                        pkg.normalization.pop("standardize", None)
                    else:
                        pkg.normalization["standardize"] = reference
                    review: dict = {}
                    img = segment_image(pkg, str(scan_files(args.data, scan)[0]), cleanup=Cleanup.for_package(pkg),
                                        review=review)
                    lab = cases[scan].frame.to_array(sitk.GetArrayFromImage(img))
                    organs = [_dice(lab[scored] == c, refs[scan][scored] == c) for c in range(1, k + 1)]
                    scores[(region, setting)].extend(d for d in organs if not math.isnan(d))
                    line.append(" / ".join(f"{d:.2f}" for d in organs) + f" = {np.nanmean(organs):.3f}")
                print(f"  {region:>6} scan {scan}, factor {review['intensity_factor']:.2f}: {line[0]} -> {line[1]}",
                      flush=True)
            group = ",".join(map(str, info["train"]))
            for (region, setting), values in scores.items():
                table[region][setting].append((folder.name, group, float(np.mean(values)), min(values)))
            print("  new scans: " + " -> ".join(f"{np.mean(scores[('other', s)]):.3f} (lowest organ "
                                                 f"{min(scores[('other', s)]):.2f})" for s in settings))
    for region, rows in table.items():
        base = [m for *_, m, _ in rows["as trained"]]
        print(f"== {region}: {len(base)} runs")
        for setting, values in rows.items():
            means = [m for *_, m, _ in values]
            diff = [a - b for a, b in zip(means, base)]
            se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
            floor = sum(low >= ORGAN_FLOOR for *_, low in values)
            by_group = defaultdict(list)
            for _, group, m, _ in values:
                by_group[group].append(m)
            spread = ", ".join(f"{g}: {np.mean(v):.3f} (SD {statistics.stdev(v):.4f})" if len(v) > 1
                               else f"{g}: {v[0]:.3f}" for g, v in by_group.items())
            print(f"  {setting:>12}: mean {np.mean(means):.3f}, minus as trained {np.mean(diff):+.3f} +- {se:.3f} (SE), "
                  f"runs with no organ below {ORGAN_FLOOR}: {floor} of {len(values)}; per training group {spread}")


if __name__ == "__main__":
    main()
