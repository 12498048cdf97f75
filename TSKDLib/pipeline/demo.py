"""The demo (the README's main-job command) on the real bundled CT.

Trains TS-KD on 4 labelled axial slices of the 20-slice TotalSegmentator example CT (liver and
spleen; the kidneys are not in these 20 slices, and a class without any labelled voxel is an
error before training), segments the whole scan with the exported student, and prints per-class Dice
and HD95 on the 16 slices that were *not* labelled, against the reference labels, plus stage
timings; writes an overlay PNG of a few slices. The reference labels are TotalSegmentator model
outputs (see Testing/Data/README.md): the figures measure agreement, not expert accuracy.

The data are found through an explicit folder (``tskd demo --data DIR``, default
:data:`DEFAULT_DATA_DIR` relative to the current directory, i.e. a checkout's root, where
``scripts/demo.sh`` runs it); the library never guesses where a checkout is.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from TSKDLib.errors import InputError
from TSKDLib.pipeline.progress import ProgressReporter

DEMO_CLASSES = ["liver", "spleen"]
DEMO_LABELLED = [2, 7, 12, 17]


#: The demo data's folder in a TSKD checkout, relative to its root: ``tskd demo --data``'s default.
DEFAULT_DATA_DIR = Path("Testing") / "Data" / "totalseg"
#: What the demo reads from that folder: the CT (DICOM series), its reference labels, the class map.
DEMO_FILES = ("ct_dicom", "example_seg_dicom.nii.gz", "label_map_total_ct.json")


def check_demo_data(data_dir: str | Path) -> Path:
    """The demo data folder ``data_dir`` as a ``Path``, once it holds every file of
    :data:`DEMO_FILES`. Raises :class:`InputError` naming the folder and the missing files."""
    d = Path(data_dir)
    missing = [f for f in DEMO_FILES if not (d / f).exists()]
    if missing:
        raise InputError(f"demo data not found (missing {', '.join(missing)}).", d,
                         f"Pass --data with the {DEFAULT_DATA_DIR.as_posix()} folder of a TSKD checkout, "
                         "or run scripts/demo.sh there.")
    return d


def run_demo(data_dir: str | Path, out: str | Path = "runs/demo", preset: str = "fast", overwrite: bool = False,
             device: str = "auto", progress: ProgressReporter | None = None) -> int:
    """Train, segment and evaluate on the bundled CT in ``data_dir`` (:func:`check_demo_data`);
    prints a report. Returns an exit code."""
    from TSKDLib.data.case import load_case
    from TSKDLib.data.geometry import LabelGeometryWarning
    from TSKDLib.evaluation.metrics import dice_hd95
    from TSKDLib.pipeline.run import RunDir, segment, train

    data = check_demo_data(data_dir)
    out = Path(out)
    run_dir = out / "run"
    progress = progress or ProgressReporter()
    t0 = time.monotonic()
    run = RunDir(run_dir)
    if run.config_path.is_file() and run.state().get("finished") and not overwrite:
        progress.log(f"reusing the finished run in {run_dir} (pass --overwrite to train again)")
    else:
        train([data / "ct_dicom"], [data / "example_seg_dicom.nii.gz"], out=run_dir, preset=preset,
              class_map=data / "label_map_total_ct.json", classes=DEMO_CLASSES,
              labelled_slices=[DEMO_LABELLED], overwrite=overwrite, device=device, progress=progress)
    train_s = time.monotonic() - t0
    pred_path = out / "ct_dicom_tskd.seg.nrrd"
    seg_out = segment(run.model_dir, [data / "ct_dicom"], out=pred_path, overwrite=True, progress=progress)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelGeometryWarning)
        ref = load_case(data / "ct_dicom", data / "example_seg_dicom.nii.gz", data / "label_map_total_ct.json",
                        classes=DEMO_CLASSES)
        pred = load_case(data / "ct_dicom", pred_path)
    ref_sl, pred_sl = ref.label_slices(), pred.label_slices()
    # map predicted segment order onto the reference class order by name
    remap = np.zeros(pred.class_map.num_classes + 1, dtype=np.int64)
    for i, name in enumerate(pred.class_map.names, start=1):
        remap[i] = DEMO_CLASSES.index(name) + 1
    pred_sl = remap[pred_sl]
    held_out = [k for k in range(ref.num_slices) if ref.file_to_canonical_slice(k) not in
                {ref.file_to_canonical_slice(j) for j in DEMO_LABELLED}]
    canon = sorted(ref.file_to_canonical_slice(k) for k in held_out)
    spacing = (ref.canonical_image.GetSpacing()[2],) + ref.slice_spacing()
    scores = dice_hd95(pred_sl[canon], ref_sl[canon], len(DEMO_CLASSES), spacing)

    state = run.state()
    lines = ["", f"TSKD demo: 20-slice CT, labelled slices {DEMO_LABELLED}, preset {preset}",
             f"Scores on the {len(canon)} slices that were not labelled (reference: TotalSegmentator labels):",
             f"  {'class':<14} {'Dice':>6} {'HD95 mm':>8}  voxels ref/pred"]
    report = {"classes": {}, "timings_s": {}}
    for k, name in enumerate(DEMO_CLASSES, start=1):
        d, h = scores[k]["dice"], scores[k]["hd95"]
        nref, npred = int((ref_sl[canon] == k).sum()), int((pred_sl[canon] == k).sum())
        ds = "n/a" if math.isnan(d) else f"{d:.3f}"
        hs = "n/a" if math.isnan(h) else f"{h:.1f}"
        note = "  (absent from these slices)" if nref == 0 else ""
        lines.append(f"  {name:<14} {ds:>6} {hs:>8}  {nref}/{npred}{note}")
        report["classes"][name] = {"dice": None if math.isnan(d) else d, "hd95_mm": None if math.isnan(h) else h,
                                   "ref_voxels": nref, "pred_voxels": npred}
    lines.append("Stage timings:")
    for stage, info in state.get("stages", {}).items():
        lines.append(f"  {stage:<13} {info.get('seconds', 0):7.1f} s")
        report["timings_s"][stage] = info.get("seconds")
    lines.append(f"  {'segment':<13} {seg_out[0]['seconds']:7.1f} s (whole scan, CPU)")
    report["timings_s"]["segment"] = seg_out[0]["seconds"]
    png = out / "overlay.png"
    write_overlay(ref, pred_sl, ref_sl, canon, png)
    lines += [f"Segmentation: {pred_path}", f"Overlay: {png}", f"Model package: {run.model_dir}",
              f"Total wall time: {time.monotonic() - t0:.0f} s (training {train_s:.0f} s)"]
    from TSKDLib.data.io import atomic_write
    text = json.dumps(report, indent=1)
    atomic_write(out / "demo_report.json", lambda tmp: tmp.write_text(text), overwrite=True)
    print("\n".join(lines), flush=True)
    return 0


def write_overlay(case, pred: np.ndarray, ref: np.ndarray, slices: list[int], path: Path, n: int = 4) -> None:
    """PNG of ``n`` slices: CT (abdomen window) with reference (left) and TSKD (right) contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from TSKDLib.data.classmap import default_color

    img = case.image_slices()
    pick = [slices[int(i)] for i in np.linspace(0, len(slices) - 1, n)]
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6.2))
    for col, k in enumerate(pick):
        for row, (lab, title) in enumerate([(ref, "reference"), (pred, "TSKD student")]):
            ax = axes[row, col]
            ax.imshow(np.clip((img[k] + 160) / 400, 0, 1), cmap="gray")
            for c in range(1, int(max(ref.max(), pred.max())) + 1):
                if (lab[k] == c).any():
                    ax.contour(lab[k] == c, levels=[0.5], colors=[np.array(default_color(c)) / 255], linewidths=1)
            ax.set_title(f"slice {k}: {title}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from TSKDLib.data.io import atomic_write
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"), overwrite=True)
    plt.close(fig)
