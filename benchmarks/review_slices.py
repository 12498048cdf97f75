"""Issue 15: can the model tell a user which slices of a new scan to correct first?

    python benchmarks/review_slices.py MODEL --test 36 34 [--n 3] [--data ../shared/data/chaos_mr_t2_dev]

For each test scan (CHAOS MR T2 dev, with its reference labels), ``segment_image`` with the default
clean-up and a :class:`TSKDLib.deploy.inference.SliceReview`; then, per slice, the true error (area
where the prediction differs from the reference, mm^2) against candidate signals: ``uncertain`` (the
review's ``uncertain_mm2``: expected wrong area under the model's softmax, what ``tskd segment``
ranks by), ``entropy`` (mean per-pixel entropy, which the Slicer module's "Label next" ranked by
until the tenth pass; it now uses ``uncertain``), ``cleanup`` (area the 3D clean-up changed) and
``sum`` (uncertain + cleanup). Prints the Spearman rank correlation of each signal with the true
error, and the true error on the ``--n`` slices each signal would have the user correct (at least 3
slices apart) next to the best possible choice (the oracle: the ``--n`` worst slices, which only the
reference can tell). Slices whose reference misses an organ (``reference_defects.bad_slices``) are
left out. Results: benchmarks/RESULTS.md, section 6, "Tenth pass". CHAOS data stay outside the
project (SOURCE.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from chaos import DEFAULT_DIR, load_scan, scan_files
from reference_defects import bad_slices

from TSKDLib.data import geometry
from TSKDLib.deploy.inference import (
    Cleanup,
    NumpyResizer,
    SliceReview,
    load_model_package,
    segment_image,
)


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two 1D arrays (Pearson correlation of their ranks)."""
    ra, rb = _rank(np.asarray(a, float)), _rank(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def pick(score: np.ndarray, n: int, gap: int = 3) -> list[int]:
    """Positions of the ``n`` highest ``score`` entries, at least ``gap`` apart (as :meth:`SliceReview.worst`)."""
    r = SliceReview(np.arange(len(score)), np.asarray(score, float))
    return r.worst(n, gap)


def _entropy(logits: np.ndarray, pkg, image: sitk.Image) -> np.ndarray:
    """``(N, C, S, S)`` logits -> ``(N,)`` mean per-pixel entropy (nats) of the softmax over the
    image area (padding excluded): the Slicer module's "Label next" signal
    (``TSKDSlicerLib.interactive.SlicePredictor.uncertainty``)."""
    frame = geometry.slice_frame(image, pkg.slice_axis)
    sp = [float(image.GetSpacing()[a]) for a in frame.perm]
    shape = frame.to_array(sitk.GetArrayViewFromImage(image)).shape[1:]
    r = NumpyResizer.create(shape, pkg.input_size, (sp[1], sp[0]))
    (t, l), (h, w) = r.pad, r.new_shape
    z = logits[:, :, t:t + h, l:l + w].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1).reshape(len(p), -1).mean(1)


def review_scan(pkg, data: Path, scan: int, n: int) -> dict:
    """Per-signal Spearman and error on the picked slices for one CHAOS scan (file order: slice k, rows j, columns i)."""
    case = load_scan(data, scan)
    ref = sitk.GetArrayFromImage(case.labels)  # (k, j, i) class indices in the file's own order, as the
    # prediction (not label_slices(): the slice frame flips these scans' j axis)
    found: dict = {}
    seen: list[np.ndarray] = []  # the logits of every batch, in slice order (entropy signal below)
    predict = pkg.predict_logits
    pkg.predict_logits = lambda x: seen.append(predict(x)) or seen[-1]
    try:
        labels = segment_image(pkg, str(scan_files(data, scan)[0]),
                               cleanup=Cleanup.for_package(pkg),
                               review=found)
    finally:
        pkg.predict_logits = predict
    pred = sitk.GetArrayFromImage(labels)  # (k, j, i): file slice k first, as ref
    raw = sitk.GetArrayFromImage(segment_image(pkg, str(scan_files(data, scan)[0])))  # no clean-up
    rv: SliceReview = found["slices"]
    order = np.argsort(rv.file_slices)  # signals in file slice order
    sp = case.image.GetSpacing()
    err = (pred != ref).reshape(len(ref), -1).sum(1) * sp[0] * sp[1]
    keep = np.setdiff1d(np.arange(len(ref)), bad_slices(ref, case.class_map.num_classes))
    changed = (pred != raw).reshape(len(ref), -1).sum(1) * sp[0] * sp[1]
    signals = {"uncertain": rv.uncertain_mm2[order], "cleanup": changed, "sum": rv.uncertain_mm2[order] + changed,
               "entropy": _entropy(np.concatenate(seen), pkg, case.image)[order]}
    out = {"slices": len(keep), "error_total": float(err[keep].sum()), "oracle": pick(err[keep], n)}
    out["oracle_error"] = float(err[keep][out["oracle"]].sum())
    for name, sig in signals.items():
        chosen = pick(sig[keep], n)
        out[name] = {"spearman": spearman(sig[keep], err[keep]), "picked": [int(keep[c]) for c in chosen],
                     "error": float(err[keep][chosen].sum())}
    out["oracle"] = [int(keep[c]) for c in out["oracle"]]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model package (RUN_DIR/model)")
    ap.add_argument("--test", type=int, nargs="+", default=[36, 34])
    ap.add_argument("--n", type=int, default=3, help="slices the user would correct")
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    args = ap.parse_args(argv)
    pkg = load_model_package(args.model)
    for scan in args.test:
        r = review_scan(pkg, Path(args.data), scan, args.n)
        print(f"image_{scan}: {r['slices']} slices, true error {r['error_total'] / 100:.0f} cm^2; "
              f"oracle slices {r['oracle']} hold {r['oracle_error'] / 100:.0f} cm^2")
        for name in ("uncertain", "entropy", "cleanup", "sum"):
            s = r[name]
            print(f"  {name:9s} Spearman {s['spearman']:+.2f}; picks {s['picked']} holding "
                  f"{s['error'] / 100:.0f} cm^2 ({s['error'] / max(r['oracle_error'], 1e-9):.0%} of the oracle's)")


if __name__ == "__main__":
    main()
