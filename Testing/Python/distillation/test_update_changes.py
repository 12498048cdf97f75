"""``tskd update`` tells the user where it changed the slices nobody corrected
(:func:`TSKDLib.distillation.update.changes_elsewhere`), with the file's own slice numbers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from TSKDLib.distillation.update import changes_elsewhere


def test_changes_elsewhere_measures_agreement_and_names_the_changed_slices():
    previous = torch.zeros(5, 8, 8, dtype=torch.long)
    previous[:, 2:6, 2:6] = 1  # class 1: 16 pixels on each of 5 slices
    updated = previous.clone()
    updated[3, 2:6, 2:6] = 0  # the update removed it from one slice ...
    updated[1, 0, 0] = 1  # ... and added one pixel on another
    updated[4, 7, 7] = 2  # class 2 appears on one pixel
    file_slices = [20, 18, 16, 14, 12]  # a flipped file: frame order runs against the file's k
    out = changes_elsewhere(previous, updated, file_slices, ["liver", "spleen", "kidney"])
    inter, total = 64, 80 + 65
    assert out["liver"]["agreement"] == pytest.approx(round(2 * inter / total, 4))
    assert out["liver"]["changed_pixels"] == 17
    assert out["liver"]["slices"] == [14, 18]  # most changed first, only slices that changed
    assert out["spleen"] == {"agreement": 0.0, "changed_pixels": 1, "slices": [12]}
    assert out["kidney"] == {"agreement": 1.0, "changed_pixels": 0, "slices": []}  # neither model paints it
