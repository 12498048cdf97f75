"""Segmentation metrics (MONAI): per-class Dice and HD95 in millimetres."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def dice_hd95(pred: np.ndarray, ref: np.ndarray, num_classes: int,
              spacing: Sequence[float] | None = None) -> dict[int, dict[str, float]]:
    """Per-class Dice and 95th-percentile Hausdorff distance of two label maps.

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
        (nothing to score); HD95 is NaN when either side is empty. Computed with MONAI's
        ``compute_dice`` and ``compute_hausdorff_distance(percentile=95)``.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    out: dict[int, dict[str, float]] = {}
    for k in range(1, num_classes + 1):
        p = torch.from_numpy(np.ascontiguousarray(pred == k))[None, None]
        r = torch.from_numpy(np.ascontiguousarray(ref == k))[None, None]
        ps, rs = bool(p.any()), bool(r.any())
        if not ps and not rs:
            out[k] = {"dice": math.nan, "hd95": math.nan}
            continue
        d = float(compute_dice(p.float(), r.float(), include_background=True, ignore_empty=False)[0, 0])
        hd = math.nan
        if ps and rs:
            hd = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                  spacing=list(spacing) if spacing is not None else None)[0, 0])
        out[k] = {"dice": d, "hd95": hd}
    return out


def nanmean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def nanstd(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.std(vals)) if len(vals) > 1 else (0.0 if vals else math.nan)
