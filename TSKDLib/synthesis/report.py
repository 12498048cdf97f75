"""Fidelity figures and the real-vs-synthetic PNG grid."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from TSKDLib.evaluation.metrics import dice


def intensity_histogram_distance(real: torch.Tensor, synthetic: torch.Tensor, bins: int = 64) -> dict[str, float]:
    """Distance between the intensity distributions of two image sets.

    Parameters
    ----------
    real, synthetic: ``(N, 1, H, W)`` / ``(M, 1, H', W')`` in ``[0, 1]`` (sizes may differ).

    Returns ``{"tv": total-variation distance of the ``bins``-bin histograms on [0, 1] (0 = same,
    1 = disjoint), "w1": 1-Wasserstein distance of the intensities (same units as the images)}``.
    """
    a = torch.as_tensor(real).float().flatten().clamp(0, 1)
    b = torch.as_tensor(synthetic).float().flatten().clamp(0, 1)
    if a.numel() == 0 or b.numel() == 0:
        return {"tv": float("nan"), "w1": float("nan")}
    ha = torch.histc(a, bins, 0, 1)
    hb = torch.histc(b, bins, 0, 1)
    tv = 0.5 * (ha / ha.sum() - hb / hb.sum()).abs().sum()
    q = torch.linspace(0, 1, 1001)
    sub = lambda x: x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    w1 = (torch.quantile(sub(a), q) - torch.quantile(sub(b), q)).abs().mean()
    return {"tv": float(tv), "w1": float(w1)}


def dice_per_slice(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Foreground-class-averaged Dice of ``(B, H, W)`` label maps, ``(B,)`` float32: the mean of
    :func:`TSKDLib.evaluation.metrics.dice` (``ignore_empty=False``) over classes ``1..K`` (K: the largest
    value in either) present in either map; 1 for a slice where no class is present."""
    if pred.numel() == 0:
        return torch.zeros(0)
    k = int(max(int(pred.max()), int(ref.max())))
    d = dice(pred, ref, k, ignore_empty=False, dtype=torch.float64)
    return torch.nan_to_num(torch.nanmean(d, 1), nan=1.0).float()


def save_grid(path: str | Path, real: torch.Tensor, real_probs: torch.Tensor | None,
              synthetic: torch.Tensor, synthetic_probs: torch.Tensor | None,
              colors: Sequence[Sequence[int]] = (), titles_real: Sequence[str] = (),
              titles_synthetic: Sequence[str] = (), dropped: Sequence[bool] = (), columns: int = 8,
              title: str = "") -> Path:
    """Write a PNG: rows of real slices, then rows of synthetic slices, each with the teacher's
    label contours (argmax of ``(n, K+1, S, S)`` probabilities, one colour per class, RGB 0..255).
    Synthetic slices the filter dropped get a red title. Written atomically; returns the path."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from TSKDLib.data.io import atomic_write

    nr = min(len(real), columns * 2)
    ns = min(len(synthetic), columns * 2)
    rows_r = -(-nr // columns) if nr else 0
    rows_s = -(-ns // columns) if ns else 0
    rows = max(rows_r + rows_s, 1)
    fig, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def draw(ax, img, probs, label, color="black"):
        ax.imshow(np.asarray(img[0], dtype=np.float32), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if probs is not None:
            lab = np.asarray(torch.as_tensor(probs).float().argmax(0))
            for c in range(1, int(probs.shape[0])):
                if (lab == c).any():
                    col = tuple(v / 255 for v in colors[c - 1]) if len(colors) >= c else "yellow"
                    ax.contour(lab == c, levels=[0.5], colors=[col], linewidths=0.8)
        ax.set_title(label, fontsize=7, color=color)

    for i in range(nr):
        draw(axes.flat[i], real[i], None if real_probs is None else real_probs[i],
             titles_real[i] if i < len(titles_real) else "real")
    off = rows_r * columns
    for i in range(ns):
        bad = bool(dropped[i]) if i < len(dropped) else False
        draw(axes.flat[off + i], synthetic[i], None if synthetic_probs is None else synthetic_probs[i],
             titles_synthetic[i] if i < len(titles_synthetic) else "synthetic", "red" if bad else "black")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), overwrite=True)
    plt.close(fig)
    return path
