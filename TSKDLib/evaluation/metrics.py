"""Segmentation metrics (MONAI): per-class Dice and HD95 in millimetres.

One Dice for every stage (teacher validation, distillation fit and agreement, synthesis report,
benchmarks): :func:`dice`, MONAI's ``compute_dice`` on one binary mask per foreground class.

**Absent-class rule.** For class ``k`` and one item (a slice, or a volume):

- ``k`` in the reference: Dice = 2|P∩R| / (|P| + |R|) (0 when ``k`` is not predicted);
- ``k`` in neither the prediction nor the reference: NaN (nothing to score);
- ``k`` predicted but absent from the reference: NaN with ``ignore_empty=True`` (MONAI's
  default; the score of a *training* signal, as teacher validation and distillation use it:
  only classes the labels show are scored), 0 with ``ignore_empty=False`` (an *evaluation*
  against complete labels, as the benchmarks and the demo report it: a false positive costs).

NaN entries are left out of every mean (:func:`nanmean`, ``torch.nanmean``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def dice(pred, ref, num_classes: int, ignore_empty: bool = True, dtype=None):
    """Per-item, per-class Dice of integer label maps (see the module's absent-class rule).

    Parameters
    ----------
    pred, ref:
        ``(B, *spatial)`` integer class indices (torch tensors or NumPy arrays of one shape; e.g.
        ``(N, H, W)`` slices, or ``(1, D, H, W)`` one volume). Classes ``1..K`` are scored;
        every other value (0, ``-1`` for unlabelled) counts as background.
    num_classes:
        K.
    ignore_empty:
        True: a class absent from the reference item is NaN; False: it is 0 when predicted.
    dtype:
        Of the result: ``torch.float32`` (default) or ``torch.float64``.

    Returns
    -------
    ``(B, K)`` tensor of Dice in ``[0, 1]``; NaN where the class is absent from both (and, with
    ``ignore_empty``, from the reference).

    Dice = 2|P∩R| / (|P| + |R|) as MONAI's ``compute_dice`` defines it, with the voxels counted
    in int64 one class at a time: exact on any volume, and no float one-hot copy of it (the
    results equal ``compute_dice``'s; ``Testing/Python/evaluation/test_metrics.py`` checks it).
    """
    import torch

    # a read-only view (e.g. a labelmap from SimpleITK) is copied: torch warns on non-writable arrays
    pred, ref = (torch.as_tensor(np.require(x, requirements=("C", "W")) if isinstance(x, np.ndarray) else x)
                 for x in (pred, ref))
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    pred, ref = pred.reshape(pred.shape[0], -1), ref.reshape(ref.shape[0], -1)
    out = torch.empty(pred.shape[0], max(num_classes, 0), dtype=torch.float64)
    for k in range(1, num_classes + 1):
        p, r = pred == k, ref == k
        r_sum = r.sum(1)
        d = 2.0 * (p & r).sum(1).double() / (p.sum(1) + r_sum).double()  # 0/0 = NaN: absent from both
        out[:, k - 1] = torch.where(r_sum == 0, float("nan"), d) if ignore_empty else d
    return out.to(dtype or torch.float32)


def dice_scores(pred, target, num_classes: int, per_slice: bool = False) -> dict:
    """Dice per foreground class of ``(N, H, W)`` label maps, and its mean (``ignore_empty``:
    a class absent from the reference is not scored).

    ``per_slice`` False: one Dice over all N slices pooled (a volume's Dice when the slices are
    one scan); True: the Dice of each slice, averaged over the slices where the class is in the
    reference (2D datasets such as HC18).

    Returns ``{"per_class": [K floats, NaN where undefined], "mean": mean of the finite ones}``.
    """
    import torch

    pred, target = torch.as_tensor(pred).long(), torch.as_tensor(target).long()
    d = dice(pred, target, num_classes) if per_slice else dice(pred[None], target[None], num_classes)
    per_class = torch.nanmean(d, 0) if d.shape[0] > 1 else d[0]
    vals = [float(v) for v in per_class]
    finite = [v for v in vals if not math.isnan(v)]
    return {"per_class": vals, "mean": float(np.mean(finite)) if finite else float("nan")}


def dice_hd95(pred: np.ndarray, ref: np.ndarray, num_classes: int,
              spacing: Sequence[float] | None = None) -> dict[int, dict[str, float]]:
    """Per-class Dice and 95th-percentile Hausdorff distance of two label maps (an evaluation:
    :func:`dice` with ``ignore_empty=False``).

    Parameters
    ----------
    pred, ref:
        Integer class-index arrays of one shape, 2D ``(H, W)`` or 3D ``(D, H, W)``.
    num_classes:
        K; classes ``1..K`` are scored.
    spacing:
        Voxel spacing in mm along the array axes (same order as the array shape); HD95 is then
        in mm (else in voxels).

    Returns
    -------
    dict
        ``{k: {"dice": float, "hd95": float}}``. Dice is NaN when the class is absent from both
        (nothing to score) and 0 when it is predicted but absent from the reference; HD95 is NaN
        when either side is empty. MONAI ``compute_hausdorff_distance(percentile=95)``.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    d = dice(pred[None], ref[None], num_classes, ignore_empty=False)[0]
    out: dict[int, dict[str, float]] = {}
    for k in range(1, num_classes + 1):
        p = torch.from_numpy(np.ascontiguousarray(pred == k))[None, None]
        r = torch.from_numpy(np.ascontiguousarray(ref == k))[None, None]
        hd = math.nan
        if bool(p.any()) and bool(r.any()):
            hd = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                  spacing=list(spacing) if spacing is not None else None)[0, 0])
        out[k] = {"dice": float(d[k - 1]), "hd95": hd}
    return out


def nanmean(values) -> float:
    """Mean of the values that are neither None nor NaN (NaN when none is left)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def nanstd(values) -> float:
    """Standard deviation of the values that are neither None nor NaN (0 for one, NaN for none)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.std(vals)) if len(vals) > 1 else (0.0 if vals else math.nan)


def summarise_seeds(groups: dict) -> dict:
    """Mean and spread over seeds of per-seed mean scores (the benchmarks' tables).

    ``groups``: ``{key: {seed: [rows with "dice" and "hd95"]}}``. Per seed, the rows' Dice and HD95
    are averaged with :func:`nanmean` (a class absent from prediction and reference does not
    count); then, over seeds: ``{key: {"dice_mean", "dice_std", "hd95_mean", "hd95_std", "n"
    (rows), "seeds"}}`` (:func:`nanmean`, :func:`nanstd`).
    """
    out = {}
    for key, by_seed in groups.items():
        dice = [nanmean([r["dice"] for r in rs]) for rs in by_seed.values()]
        hd = [nanmean([r["hd95"] for r in rs]) for rs in by_seed.values()]
        out[key] = {"dice_mean": nanmean(dice), "dice_std": nanstd(dice), "hd95_mean": nanmean(hd),
                    "hd95_std": nanstd(hd), "n": sum(len(rs) for rs in by_seed.values()), "seeds": len(by_seed)}
    return out
