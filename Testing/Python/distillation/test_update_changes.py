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


class _Fixed(torch.nn.Module):
    """A stand-in student whose logits are given: class ``pred`` wins on every pixel."""

    def __init__(self, pred: torch.Tensor, num_classes: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.logits = torch.nn.functional.one_hot(pred, num_classes + 1).permute(0, 3, 1, 2).float()

    def forward(self, x):
        return self.logits[: len(x)] + self.w


def test_corrected_slice_scores_counts_what_the_model_paints_where_the_user_drew_none():
    from TSKDLib.distillation.update import corrected_slice_scores

    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    labels[0, 1:3, 1:3] = 1  # slice 0: 4 pixels of liver; slice 1: an organ-free slice the user cleared
    pred = torch.zeros(2, 6, 6, dtype=torch.long)
    pred[0, 1:3, 1:3] = 1
    pred[1, 4:6, 4:6] = 1  # the model paints liver on the organ-free slice ...
    pred[1, 0, :3] = 2  # ... and 3 pixels of spleen
    dice, painted = corrected_slice_scores(_Fixed(pred, 2), torch.zeros(2, 1, 6, 6), labels, ["liver", "spleen"])
    assert dice["liver"] == pytest.approx(2 * 4 / (8 + 4))
    assert dice["spleen"] != dice["spleen"]  # NaN: on none of the corrected slices
    assert painted == {"liver": 4, "spleen": 3}  # liver on slice 1 only: slice 0 holds liver


def test_quick_update_may_stop_after_100_steps_on_any_transfer_set():
    """A quick update keeps its own stopping rule: the ``fast`` preset's ``min_epochs`` (a guard
    for multi-scan training) would hold a 150-step update on a large transfer set to the end."""
    from TSKDLib.distillation.update import DEFAULT_STEPS, _update_config

    cfg = _update_config(DEFAULT_STEPS, 40, 0, "cpu", None)
    assert cfg.evidence_after(40) == cfg.evidence_after(500) == min(DEFAULT_STEPS, 100)
